"""Serving: the real `mlflow models serve` process (started through `cifake serve`) and `cifake predict`.

One tiny model is trained and registered per module; the server runs on 127.0.0.1 on a free port and is
stopped at the end. Every request form must give the in-process pyfunc's answers, every bad input a 4xx
or a per-row error, and the server must still answer /ping afterwards.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image
from servers import cifake_server, http_status, using_store

from cifake_core import pipeline
from cifake_core.cli import main
from cifake_core.config import load_config

pytestmark = pytest.mark.slow
MODEL_URI = "models:/cifake-detector@production"


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"save_all": True} if fmt == "GIF" else {}))
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _good_images() -> list[bytes]:
    gradient = Image.linear_gradient("L").resize((64, 48)).convert("RGB")
    return [
        _encoded(Image.new("RGB", (32, 32), (200, 40, 40)), "PNG"),
        _encoded(gradient, "JPEG"),
        _encoded(Image.new("RGBA", (80, 80), (0, 90, 200, 128)), "PNG"),
    ]


def _claimed_size_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height pixels: a decompression bomb's signature."""
    data = bytearray(_encoded(Image.new("RGB", (1, 1)), "PNG"))
    header_start = 8 + 8  # signature, then the IHDR chunk's length and type
    data[header_start : header_start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : header_start + 13]))
    data[header_start + 13 : header_start + 17] = struct.pack(">I", crc)
    return bytes(data)


def _bad_images() -> dict[str, str]:
    good_png = _good_images()[0]
    animated = io.BytesIO()
    frames = [Image.new("RGB", (8, 8), color) for color in ("red", "blue")]
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:])
    return {
        "invalid base64": "this is not base64!",
        "not an image": _b64(b"hello, I am a text file"),
        "empty value": "",
        "truncated": _b64(good_png[: len(good_png) // 2]),
        "too large": _b64(_claimed_size_png(60_000, 60_000)),
        "animated": _b64(animated.getvalue()),
    }


def _post(url: str, body: bytes | dict, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _ping(base_url: str) -> int:
    return http_status(f"{base_url}/ping")


@pytest.fixture(scope="module")
def registered(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A tracking store with a tiny model registered as production version 1."""
    with using_store(f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}") as uri:
        config = load_config(None, {"data_dir": str(tiny_demo), "epochs": "1", "batch_size": "16", "num_workers": "0"})
        pipeline.train(config)
        yield {"uri": uri}


@pytest.fixture
def store(registered: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(registered["uri"])
    return registered["uri"]


@pytest.fixture(scope="module")
def server(registered: dict[str, str]) -> Iterator[str]:
    with cifake_server(["serve"], {"MLFLOW_TRACKING_URI": registered["uri"]}, "/ping") as base_url:
        yield base_url


@pytest.fixture(scope="module")
def in_process(registered: dict[str, str]) -> mlflow.pyfunc.PyFuncModel:
    mlflow.set_tracking_uri(registered["uri"])
    return mlflow.pyfunc.load_model(MODEL_URI)


def _request_forms(images: list[str]) -> dict[str, dict]:
    return {
        "dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]}},
        "dataframe_records": {"dataframe_records": [{"image": image} for image in images]},
        "inputs": {"inputs": {"image": images}},
    }


@pytest.mark.parametrize("form", ["dataframe_split", "dataframe_records", "inputs"])
def test_every_request_form_gives_the_in_process_answers(server: str, in_process, form: str):
    images = [_b64(data) for data in _good_images()]
    status, body = _post(f"{server}/invocations", _request_forms(images)[form])
    assert status == 200, body
    served = pd.DataFrame(body["predictions"])
    expected = in_process.predict(pd.DataFrame({"image": images}))
    assert served["label"].tolist() == expected["label"].tolist()
    assert served["prob_ai"].tolist() == pytest.approx(expected["prob_ai"].tolist(), abs=1e-6)
    assert served["threshold"].tolist() == expected["threshold"].tolist()
    assert set(served["model_version"]) == {"cifake-detector/1"}
    assert set(served["error"]) == {""}


def test_a_data_url_prefix_is_accepted(server: str):
    image = "data:image/png;base64," + _b64(_good_images()[0])
    status, body = _post(f"{server}/invocations", {"inputs": {"image": [image]}})
    assert status == 200 and body["predictions"][0]["label"] in {"ai", "real"}, body


def test_the_threshold_can_be_chosen_per_request(server: str, in_process):
    images = [_b64(_good_images()[0])]
    thresholds = in_process.unwrap_python_model().thresholds
    for requested, expected in (("fpr_1pct", thresholds["fpr_1pct"]), ("0.25", 0.25)):
        status, body = _post(f"{server}/invocations", {"inputs": {"image": images}, "params": {"threshold": requested}})
        assert status == 200, body
        assert body["predictions"][0]["threshold"] == pytest.approx(expected)
    status, body = _post(f"{server}/invocations", {"inputs": {"image": images}, "params": {"threshold": "banana"}})
    assert status == 400 and "threshold must be one of" in body["message"]


def test_bad_images_get_their_own_row_and_good_ones_are_still_classified(server: str):
    bad = _bad_images()
    images = [_b64(_good_images()[1]), *bad.values()]
    status, body = _post(f"{server}/invocations", {"dataframe_records": [{"image": image} for image in images]})
    assert status == 200, body
    rows = body["predictions"]
    assert rows[0]["error"] == "" and rows[0]["label"] in {"ai", "real"}
    for (problem, _), row in zip(bad.items(), rows[1:], strict=True):
        assert row["label"] == "error" and row["error"], problem
    messages = {problem: row["error"] for problem, row in zip(bad, rows[1:], strict=True)}
    assert "invalid base64" in messages["invalid base64"]
    assert "not an image" in messages["not an image"]
    assert "empty" in messages["empty value"]
    assert "too large" in messages["too large"]
    assert "animated" in messages["animated"]
    assert _ping(server) == 200


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ({"dataframe_records": [{"picture": "abc"}]}, "application/json"),  # wrong column name
        (b"this is { not json", "application/json"),
        (b"", "application/json"),
    ],
)
def test_malformed_requests_get_a_4xx_and_the_server_stays_up(server: str, body, content_type: str):
    status, answer = _post(f"{server}/invocations", body, content_type)
    assert 400 <= status < 500, answer
    assert _ping(server) == 200


def test_a_number_instead_of_base64_text_is_that_rows_error(server: str):
    status, body = _post(
        f"{server}/invocations", {"dataframe_records": [{"image": 12345}, {"image": _b64(_good_images()[0])}]}
    )
    assert status == 200, body
    assert body["predictions"][0]["label"] == "error" and "expected a base64 string" in body["predictions"][0]["error"]
    assert body["predictions"][1]["label"] in {"ai", "real"}


def test_serving_a_missing_alias_is_a_clear_error(store: str, capsys):
    assert main(["serve", "--model_uri", "models:/cifake-detector@staging"]) == 2
    assert "has no alias 'staging'" in capsys.readouterr().err


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    good = _good_images()
    (folder / "red.png").write_bytes(good[0])
    (folder / "nested" / "gradient one.jpg").write_bytes(good[1])
    (folder / "broken.jpg").write_bytes(good[1][:40])
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    return folder


def test_predict_writes_csv_and_jsonl_and_reports_failures(store: str, photo_folder: Path, tmp_path: Path):
    csv_path, jsonl_path = tmp_path / "results.csv", tmp_path / "results.jsonl"
    assert main(["predict", str(photo_folder), "--output", str(csv_path)]) == 1  # one file is broken
    assert main(["predict", str(photo_folder), "--output", str(jsonl_path), "--threshold", "0.5"]) == 1
    table = pd.read_csv(csv_path, keep_default_na=False)
    assert sorted(Path(p).name for p in table["path"]) == ["broken.jpg", "gradient one.jpg", "red.png"]
    broken = table[table["path"].str.endswith("broken.jpg")].iloc[0]
    assert broken["label"] == "error" and "truncated" in broken["error"]
    assert set(table[table["error"] == ""]["label"]) <= {"ai", "real"}
    records = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    assert len(records) == 3 and {record["threshold"] for record in records} == {0.5}


def test_predict_prints_a_table_and_exits_0_when_all_succeed(store: str, photo_folder: Path, capsys):
    (photo_folder / "broken.jpg").unlink()
    (photo_folder / "nested" / "caf\udce9.png").write_bytes(_good_images()[0])  # a name in Latin-1 bytes
    assert main(["predict", str(photo_folder / "red.png"), str(photo_folder / "nested")]) == 0
    out = capsys.readouterr().out
    assert "red.png" in out and "gradient one.jpg" in out and "caf\\xe9.png" in out and "prob_ai" in out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["/no/such/folder"], "does not exist"),
        (["PHOTOS", "--output", "results.xlsx"], "--output must end in .csv or .jsonl"),
        (["PHOTOS", "--threshold", "2"], "threshold must be one of"),
        (["PHOTOS", "--model_uri", "models:/cifake-detector/99"], "cannot load model"),
    ],
)
def test_predict_mistakes_are_one_clear_line(store: str, photo_folder: Path, capsys, arguments, message):
    resolved = [str(photo_folder) if argument == "PHOTOS" else argument for argument in arguments]
    assert main(["predict", *resolved]) == 2
    assert message in capsys.readouterr().err
