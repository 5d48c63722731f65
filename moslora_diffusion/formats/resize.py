"""Shrinking an adapter's rank exactly (Eckart-Young), and the mixer statistics ``moslora inspect`` shows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .state import AdapterState, ComponentAdapter, LayerFactors, config_scale


@dataclass
class ResizeReport:
    """Per layer ("component.module"): the retained energy ||W_k||^2 / ||W||^2 and the singular values."""

    rank: int
    energy: dict[str, float] = field(default_factory=dict)
    singular_values: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> str:
        values = list(self.energy.values())
        if not values:
            return f"rank {self.rank}: no layers"
        return (
            f"rank {self.rank}: {len(values)} layers, retained energy min {min(values):.6f}, "
            f"mean {sum(values) / len(values):.6f}, max {max(values):.6f}"
        )


def resize_adapter(state: AdapterState, rank: int) -> tuple[AdapterState, ResizeReport]:
    """The best rank-``rank`` approximation of every layer's s B M A (Eckart-Young, exact).

    With B = Q_B R_B and A^T = Q_A R_A (thin QR), s B M A = Q_B (s R_B M R_A^T) Q_A^T, so the SVD of the
    small r x r core U S V^T gives the SVD of the whole delta. Keeping k singular values:
    B_k = Q_B U_k sqrt(S_k / s'), A_k = sqrt(S_k / s') V_k^T Q_A^T, M_k = I, where s' is the scale of
    the resized config (same alpha, r = k). Layers whose delta has rank below k are zero-padded. The
    resized config records M's init as "identity", since that is the M the file holds.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--rank must be a positive integer, got {rank!r}")
    report = ResizeReport(rank)
    components = {}
    for component, adapter in state.components.items():
        largest = max(layer.rank for layer in adapter.layers.values())
        if rank > largest:
            raise ValueError(f"cannot resize {component} to rank {rank}: its rank is {largest} (resizing only shrinks)")
        config = dict(adapter.config, r=rank, rank_pattern={})
        keep_mixer = bool(config.get("use_moslora"))
        if keep_mixer:
            config["mixer_init"] = "identity"  # the metadata describes the file: its resized M is I
        layers = {}
        for path, layer in adapter.layers.items():
            new_scale = config_scale(config, path)
            layers[path], energy, values = _resize_layer(layer, rank, new_scale, keep_mixer)
            report.energy[f"{component}.{path}"] = energy
            report.singular_values[f"{component}.{path}"] = values
        components[component] = ComponentAdapter(config, layers, adapter.resolved)
    return replace(state, components=components), report


def _resize_layer(
    layer: LayerFactors, k: int, new_scale: float, keep_mixer: bool
) -> tuple[LayerFactors, float, list[float]]:
    a = layer.lora_A.double().flatten(1)  # (r, in)
    b = layer.lora_B.double().flatten(1)  # (out, r)
    m = layer.mixer.double() if layer.mixer is not None else torch.eye(layer.rank, dtype=torch.float64)
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    core = layer.scale * (r_b @ m @ r_a.T)
    u, s, vh = torch.linalg.svd(core)
    total = float((s**2).sum())
    kept = min(k, s.shape[0])
    energy = float((s[:kept] ** 2).sum()) / total if total > 0 else 1.0
    root = (s[:kept] / abs(new_scale)).sqrt()
    new_b = (q_b @ u[:, :kept]) * root * math.copysign(1.0, new_scale)
    new_a = root[:, None] * (vh[:kept] @ q_a.T)
    if kept < k:
        new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], k - kept)], dim=1)
        new_a = torch.cat([new_a, new_a.new_zeros(k - kept, new_a.shape[1])], dim=0)
    new_a = new_a.reshape(k, *layer.lora_A.shape[1:]).to(layer.lora_A.dtype)
    new_b = new_b.reshape(layer.lora_B.shape[0], k, *layer.lora_B.shape[2:]).to(layer.lora_B.dtype)
    mixer = torch.eye(k, dtype=layer.lora_A.dtype) if keep_mixer else None
    return LayerFactors(new_a, new_b, mixer, new_scale, layer.source_key), energy, [float(v) for v in s]


def mixer_statistics(mixer: torch.Tensor) -> dict[str, float]:
    """Singular values of M and how far M is from the identity (plain LoRA): ||M - I||_F / ||I||_F."""
    m = mixer.double()
    values = torch.linalg.svdvals(m)
    eye = torch.eye(m.shape[0], dtype=torch.float64)
    return {
        "singular_values": [float(v) for v in values],
        "sv_max": float(values[0]),
        "sv_min": float(values[-1]),
        "condition": float(values[0] / values[-1]) if float(values[-1]) > 0 else math.inf,
        "distance_from_identity": float(torch.linalg.matrix_norm(m - eye) / math.sqrt(m.shape[0])),
    }
