"""Shared fixtures. Everything here runs on CPU with tiny shapes."""

import pytest
import torch

from dist_diffusion.core.schedule import make_schedule


class TinyDenoiser(torch.nn.Module):
    """A small conditional network (x_t, t, label) -> prediction that behaves like a
    trained one: the exact prediction for unit-Gaussian data (eps* = sqrt(1 - a_t) x_t,
    v* = 0) plus a bounded learned term that depends on t and the label. Samples stay
    O(1), so trajectory differences measure sampler math, not blow-up."""

    def __init__(self, schedule: str = "linear", prediction: str = "epsilon", channels: int = 3,
                 num_classes: int = 4, hidden: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.alphas_cumprod = make_schedule(schedule).alphas_cumprod
        self.prediction = prediction
        self.inp = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.t_emb = torch.nn.Linear(4, hidden)
        self.y_emb = torch.nn.Embedding(num_classes + 1, hidden)
        self.out = torch.nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x, t, labels):
        angle = t.float()[:, None] / 1000.0 * torch.tensor([3.0, 7.0])
        cond = self.t_emb(torch.cat([angle.sin(), angle.cos()], dim=1)) + self.y_emb(labels)
        h = torch.nn.functional.silu(self.inp(x) + cond[:, :, None, None])
        a = self.alphas_cumprod[t].to(x.dtype)[:, None, None, None]
        exact = (1 - a).sqrt() * x if self.prediction == "epsilon" else torch.zeros_like(x)
        return exact + 0.1 * torch.tanh(self.out(h))


def make_tiny_model(schedule: str = "linear", prediction: str = "epsilon"):
    model = TinyDenoiser(schedule, prediction).eval()
    return lambda x, t, y: model(x, t, y)


@pytest.fixture
def tiny_model():
    return make_tiny_model()
