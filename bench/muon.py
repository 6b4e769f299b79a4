"""Muon for the convolutions: the real training stage with most convolutions' updates orthogonalised.

Muon (github.com/KellerJordan/Muon) replaces each weight matrix's update by the nearest semi-orthogonal matrix
(five Newton-Schulz iterations on the Nesterov momentum). Here it updates every convolution with more than one
input channel per group, flattened to out x (in x k x k), except the stem (the first layer) and the 960 -> 1280
head convolution (32 of the 43 GFLOP a step the iterations would cost); those, the depthwise convolutions,
BatchNorm and the classifier keep AdamW. The update is scaled to AdamW's size (0.2 x sqrt of the larger side,
Moonshot's rule), so the config's `lr` and `weight_decay` apply unchanged, and the one-cycle schedule drives
both kinds of parameter, its momentum cycling included. `torch.optim.Muon` takes 2-D parameters only, hence
this class. Measured and not kept: docs/BENCHMARKS.md, "Muon for the convolutions".

Usage (any `cifake train` flag works; AdamW's settings, as it replaces AdamW):
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/muon.py train \\
        --config experiments/cifake_adamw.yaml --epochs 4 --device cpu
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cifake_core import pipeline  # noqa: E402
from cifake_core.cli import main  # noqa: E402
from cifake_core.engine import one_cycle_schedule, weight_decay_groups  # noqa: E402

# Keller Jordan's quintic iteration: its slope at 0 is pushed high so that 5 steps suffice.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5
ADAMW_RMS_MATCH = 0.2
ADAMW_LAYERS = ("conv_stem", "conv_head")


def orthogonalised(matrix: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """`matrix` with its singular values pushed to about 1 (into roughly 0.7-1.2), its singular vectors kept."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.T if tall else matrix
    x = x / x.norm().clamp(min=eps)
    for _ in range(NEWTON_SCHULZ_STEPS):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def takes_muon(name: str, parameter: torch.Tensor) -> bool:
    """A convolution mixing channels (not depthwise), other than the stem and the head convolution."""
    return parameter.ndim == 4 and parameter.shape[1] > 1 and not any(layer in name for layer in ADAMW_LAYERS)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the parameters `takes_muon` picks, AdamW for the rest; one `lr`, `weight_decay` (on the weights of
    more than one dimension) and `betas` (the Muon momentum is `betas[0]`), so that `OneCycleLR` schedules both."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-8):
        muon, adamw = [], []
        for name, parameter in model.named_parameters():
            (muon if takes_muon(name, parameter) else adamw).append(parameter)
        groups = [{"params": muon, "muon": True}] + [{**group, "muon": False} for group in weight_decay_groups(adamw)]
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, beta1, beta2 = group["lr"], *group["betas"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                grad, state = parameter.grad, self.state[parameter]
                parameter.mul_(1 - lr * group["weight_decay"])
                if group["muon"]:
                    momentum = state.setdefault("momentum", torch.zeros_like(parameter))
                    momentum.lerp_(grad, 1 - beta1)
                    update = grad.lerp(momentum, beta1).flatten(1)
                    scale = ADAMW_RMS_MATCH * math.sqrt(max(update.shape))
                    parameter.add_(orthogonalised(update).view_as(parameter), alpha=-lr * scale)
                    continue
                if not state:
                    state.update(step=0, mean=torch.zeros_like(parameter), square=torch.zeros_like(parameter))
                state["step"] += 1
                state["mean"].lerp_(grad, 1 - beta1)
                state["square"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denominator = (state["square"].sqrt() / math.sqrt(1 - beta2 ** state["step"])).add_(group["eps"])
                parameter.addcdiv_(state["mean"], denominator, value=-lr / (1 - beta1 ** state["step"]))


def one_cycle_muon(
    model: torch.nn.Module, optimizer: str, lr: float, weight_decay: float, total_steps: int
) -> tuple[MuonAdamW, torch.optim.lr_scheduler.OneCycleLR]:
    """`engine.one_cycle_optimizer` with `MuonAdamW` in AdamW's place."""
    if optimizer != "adamw":
        raise SystemExit(
            f"bench/muon.py replaces AdamW, got optimizer={optimizer}: run it with AdamW's settings, "
            "--config experiments/cifake_adamw.yaml (or --optimizer adamw --lr 0.008 --weight_decay 0.05)"
        )
    muon = MuonAdamW(model, lr, weight_decay)
    return muon, one_cycle_schedule(muon, lr, total_steps)


if __name__ == "__main__":
    pipeline.one_cycle_optimizer = one_cycle_muon
    sys.exit(main(sys.argv[1:]))
