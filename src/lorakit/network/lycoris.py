"""LyCORIS networks as `--network_module lycoris.kohya` trains them: LoHa, LoKr and DoRA.

Files carry kohya's module names (`lora_unet_…`, `lora_te_…`, the same map as networks.lora) with
LyCORIS's tensor names (`hada_w1_a`, `lokr_w1`, `lora_down.weight`, `dora_scale`, `alpha`), so
A1111/Forge/ComfyUI load them as LyCORIS files. Shapes, init and scale follow LyCORIS's
`lycoris/modules/{locon,loha,lokr}.py` (lycoris-lora 4.1.3; tests compare against it).

Why our own small modules and not peft's LoHa/LoKr layers (peft 0.21, checked against lycoris-lora
4.1.3): the tensor layouts agree (peft's `use_effective_conv2d` is LyCORIS's `use_tucker`, its LoKr
full-matrix rule is LyCORIS's), but peft's LoKr `factorization` does not swap to m <= n when the
factor exceeds sqrt(dim) (dim 1280, factor 64: peft (64, 20), LyCORIS (20, 64): other shapes than
A1111 users' files), peft's LoHa init is kaiming/kaiming/
kaiming with `hada_w2_b` zero where LyCORIS draws w1_b, w2_b ~ N(0, 1), w1_a ~ N(0, 0.1) with
`hada_w2_a` zero (a different start, so different training); peft's LoKr does not force alpha to the
rank when both Kronecker halves are full matrices (LyCORIS stores alpha = rank there and A1111 reads
scale 1, so peft's scale would differ from what the file says); neither has DoRA, and peft's
LoRA-DoRA is output-axis only and detaches the norm from the gradient (LyCORIS does neither).
Patching those into peft's internals (ParameterDicts, `scaling`) would cost more than these modules.
Plain `algo=lora/locon` (no DoRA/Tucker/dropouts) stays on peft's LoRA (network/lora.py): that file already
is a LyCORIS LoCon file (same keys, shapes, kaiming/zero init and alpha).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .targets import Target, unet_module_name


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dimension: LyCORIS's LoKr split (functional/general.py). A factor that
    divides `dimension` is taken as is; otherwise the most balanced split with m <= factor (-1: any)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def weight_norm(weight: torch.Tensor, on_output: bool) -> torch.Tensor:
    """DoRA's norm of `weight`: per output row (out, 1[, 1, 1]) or per input column (1, in[, 1, 1])."""
    ones = [1] * (weight.dim() - 1)
    if on_output:
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *ones)
    return (
        weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1).reshape(1, weight.shape[1], *ones[1:])
    )


class LycorisModule(nn.Module):
    """One adapted Linear/Conv2d. The original module stays where it is (its forward is wrapped, as
    kohya/LyCORIS do), so the model's module tree and state dict do not change."""

    FILE_NAMES: dict[str, str] = {}  # attribute -> tensor name in the file, where they differ

    def __init__(
        self,
        target: Target,
        dora: bool = False,
        wd_on_output: bool = True,
        use_tucker: bool = False,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        **_,  # another algo's options (LoKr's factor, decompose_both)
    ):
        super().__init__()
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        org = target.module
        self.org = [org]  # a list: not a submodule, so parameters() and .to() leave the base alone
        self.shape = tuple(org.weight.shape)
        self.is_conv = isinstance(org, nn.Conv2d)
        # LyCORIS: Tucker form only where there is a kernel to factor (3x3, not 1x1)
        self.tucker = use_tucker and self.is_conv and any(k != 1 for k in self.shape[2:])
        self.rank = target.rank
        self.alpha = float(target.alpha or target.rank)  # LyCORIS: alpha 0/None -> rank (scale 1)
        self.multiplier = 1.0
        self.wd_on_output = wd_on_output
        self.dora_scale = (
            nn.Parameter(weight_norm(org.weight.detach().float(), wd_on_output)) if dora else None
        )
        self.org_forward = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def diff(self) -> torch.Tensor:
        """The unscaled ΔW in the original weight's shape."""
        raise NotImplementedError

    @property
    def dropping(self) -> bool:
        """Dropouts apply in training steps only: not while sampling or measuring (no gradients there).
        (A gradient-checkpointing recompute redraws the same masks: torch.utils.checkpoint keeps the RNG.)"""
        return self.training and torch.is_grad_enabled()

    def delta(self) -> torch.Tensor:
        """What this module adds to the original weight at the current multiplier (float32)."""
        diff = self.diff() * self.scale
        if self.rank_dropout and self.dropping:  # LyCORIS: drops output rows of ΔW (before DoRA)
            keep = torch.rand(diff.shape[0], device=diff.device) > self.rank_dropout
            diff = diff * keep.to(diff.dtype).view(-1, *[1] * (diff.dim() - 1))
        if self.dora_scale is None:
            return diff * self.multiplier
        w = self.org[0].weight.detach().float()
        merged = w + diff
        # LyCORIS's weight_decompose (its eps keeps a zero row finite). At strength m this gives
        # m·(W' − W), as A1111 and ComfyUI apply a DoRA file, so m = 0 is the base model; LyCORIS's own
        # module interpolates the scale instead (W + ΔW at m = 0). Both agree at m = 1, where training runs.
        norm = weight_norm(merged, self.wd_on_output) + torch.finfo(merged.dtype).eps
        return (merged * (self.dora_scale / norm) - w) * self.multiplier

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.org_forward(x, *args, **kwargs)
        if self.module_dropout and self.dropping and torch.rand(1).item() < self.module_dropout:
            return out
        delta = self.delta().to(x.dtype)
        org = self.org[0]
        if self.is_conv:
            return out + F.conv2d(x, delta, None, org.stride, org.padding, org.dilation, org.groups)
        return out + F.linear(x, delta)

    def apply_to(self) -> None:
        org = self.org[0]
        self.org_forward = org.forward
        org.forward = self.forward

    def restore(self) -> None:
        if self.org_forward is not None:
            del self.org[0].forward  # the instance attribute: the class's forward shows again
            self.org_forward = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """LyCORIS's tensor name -> parameter (no alpha)."""
        return {self.FILE_NAMES.get(name, name): p for name, p in self.named_parameters()}


def rebuild_tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A Tucker-form kernel: core t (r, r, kh, kw), wa (r, out), wb (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("i j ..., i p, j r -> p r ...", t, wa, wb)


class LoConModule(LycorisModule):
    """LoRA/LoCon (here with DoRA or Tucker; plain LoCon is peft's): `lora_down` (r, in[, kh, kw])
    kaiming, `lora_up` (out, r[, 1, 1]) 0; Tucker: down (r, in, 1, 1), `lora_mid` (r, r, kh, kw) kaiming."""

    FILE_NAMES = {"lora_down": "lora_down.weight", "lora_up": "lora_up.weight", "lora_mid": "lora_mid.weight"}

    def __init__(self, target: Target, **options):
        super().__init__(target, **options)
        out, inn, *k = self.shape
        ones = [1] * len(k)
        r = self.rank
        self.lora_down = nn.Parameter(torch.empty(r, inn, *(ones if self.tucker else k)))
        self.lora_up = nn.Parameter(torch.zeros(out, r, *ones))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))
        if self.tucker:
            self.lora_mid = nn.Parameter(torch.empty(r, r, *k))
            nn.init.kaiming_uniform_(self.lora_mid, a=math.sqrt(5))

    def diff(self) -> torch.Tensor:
        up, down = self.lora_up.flatten(1), self.lora_down.flatten(1)
        if self.tucker:
            return rebuild_tucker(self.lora_mid, up.T, down)
        return (up @ down).reshape(self.shape)


class LoHaModule(LycorisModule):
    """LoHa: ΔW = (w1_a w1_b) ⊙ (w2_a w2_b); w*_a (out, r), w*_b (r, in·kh·kw): a conv's kernel is
    flattened into w*_b. Tucker (3x3 convs): cores hada_t1/t2 (r, r, kh, kw), w*_a (r, out), w*_b (r, in).
    Init as LyCORIS: w1_b, w2_b ~ N(0, 1), w1_a ~ N(0, 0.1), t ~ N(0, 0.1), w2_a = 0, so ΔW starts at 0."""

    def __init__(self, target: Target, **options):
        super().__init__(target, **options)
        out, inn, *k = self.shape
        r = self.rank
        if self.tucker:
            self.hada_t1 = nn.Parameter(torch.empty(r, r, *k))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, *k))
            a_shape, b_shape = (r, out), (r, inn)
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
        else:
            a_shape, b_shape = (out, r), (r, inn * math.prod(k))
        self.hada_w1_a = nn.Parameter(torch.empty(a_shape))
        self.hada_w1_b = nn.Parameter(torch.empty(b_shape))
        self.hada_w2_a = nn.Parameter(torch.zeros(a_shape))
        self.hada_w2_b = nn.Parameter(torch.empty(b_shape))
        nn.init.normal_(self.hada_w1_b, std=1)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1)

    def diff(self) -> torch.Tensor:
        if self.tucker:
            w1 = rebuild_tucker(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            return w1 * rebuild_tucker(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
        return ((self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)).reshape(self.shape)


class LoKrModule(LycorisModule):
    """LoKr: ΔW = kron(w1, w2) with out = l·k, in = m·n split by `factorization`. w1 (l, m) is a full
    matrix unless decompose_both and r < max(l, m)/2 (then w1_a (l, r) · w1_b (r, m)); w2 is
    w2_a (k, r) · w2_b (r, n·kh·kw) unless r >= max(k, n)/2 (then full (k, n[, kh, kw])). Both full:
    alpha is forced to r (scale 1), as LyCORIS stores it. Init: w1 kaiming, w2 (or w2_b) zero."""

    def __init__(self, target: Target, factor: int = -1, decompose_both: bool = False, **options):
        super().__init__(target, **options)
        out, inn, *k = self.shape
        out_l, out_k = factorization(out, factor)
        in_m, in_n = factorization(inn, factor)
        r = self.rank
        if decompose_both and r < max(out_l, in_m) / 2:
            self.lokr_w1_a = nn.Parameter(torch.empty(out_l, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, in_m))
            nn.init.kaiming_uniform_(self.lokr_w1_a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))
            full_w1 = False
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m))
            nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
            full_w1 = True
        if r >= max(out_k, in_n) / 2:
            self.lokr_w2 = nn.Parameter(torch.zeros(out_k, in_n, *k))
            if full_w1:
                self.alpha = float(r)
        elif self.tucker:  # core lokr_t2 (r, r, kh, kw), w2_a (r, k), w2_b (r, n)
            self.lokr_t2 = nn.Parameter(torch.empty(r, r, *k))
            self.lokr_w2_a = nn.Parameter(torch.empty(r, out_k))
            self.lokr_w2_b = nn.Parameter(torch.zeros(r, in_n))
            nn.init.kaiming_uniform_(self.lokr_t2, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, r))
            self.lokr_w2_b = nn.Parameter(torch.zeros(r, in_n * math.prod(k)))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))

    def diff(self) -> torch.Tensor:
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        if hasattr(self, "lokr_w2"):
            w2 = self.lokr_w2
        elif hasattr(self, "lokr_t2"):
            w2 = rebuild_tucker(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b
        w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim()))
        return torch.kron(w1, w2.contiguous()).reshape(self.shape)  # kron fails on an einsum's strides


MODULES = {"lora": LoConModule, "locon": LoConModule, "loha": LoHaModule, "lokr": LoKrModule}


def lycoris_targets(n, family, base, parts: set[str]) -> list[Target]:
    """lycoris.kohya's targets for NetworkConfig `n`: preset attn-mlp = kohya's LoRA targets; full =
    those plus the ResNet/sampler convs (3x3 at conv_dim, default network_dim; alpha conv_alpha,
    default network_alpha, as LyCORIS's create_network) and the family's lycoris_full_unet_paths."""
    dim, alpha = n.network_dim, n.network_alpha
    if n.lycoris_preset == "attn-mlp":
        return family.lora_targets(base, dim, alpha, None, None, parts)
    conv_dim, conv_alpha = n.conv_dim or dim, n.conv_alpha or alpha
    targets = family.lora_targets(base, dim, alpha, conv_dim, conv_alpha, parts)
    if "unet" in parts:
        known = {t.name for t in targets}
        for path in family.lycoris_full_unet_paths:
            module = base.unet.get_submodule(path)
            is_3x3 = isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)
            rank, a = (conv_dim, conv_alpha) if is_3x3 else (dim, alpha)
            name = unet_module_name(path)
            if name not in known:
                targets.append(Target(name, path, module, rank, a, is_te=False))
    return targets


def build_network(n, family, base, roots: Mapping[str, nn.Module], parts: set[str]):
    """The network NetworkConfig `n` asks for: peft LoRA for networks.lora and plain lycoris
    lora/locon, LycorisNetwork for loha, lokr, DoRA, Tucker and the dropouts."""
    from .lora import LoRANetwork

    if n.network_module != "lycoris.kohya":
        targets = family.lora_targets(base, n.network_dim, n.network_alpha, n.conv_dim, n.conv_alpha, parts)
        return LoRANetwork.from_targets(roots, targets)
    targets = lycoris_targets(n, family, base, parts)
    if n.algo in ("lora", "locon") and not (n.dora_wd or n.use_tucker or n.rank_dropout or n.module_dropout):
        # LyCORIS: alpha 0 means alpha = rank; kohya's networks.lora would keep the 0
        targets = [t if t.alpha else dataclasses.replace(t, alpha=float(t.rank)) for t in targets]
        return LoRANetwork.from_targets(roots, targets)
    return LycorisNetwork(
        roots,
        targets,
        n.algo,
        dora=n.dora_wd,
        wd_on_output=n.wd_on_output,
        use_tucker=n.use_tucker,
        rank_dropout=n.rank_dropout,
        module_dropout=n.module_dropout,
        factor=n.factor,
        decompose_both=n.decompose_both,
    )


class LycorisNetwork:
    """LoHa / LoKr / DoRA modules on `targets`; the same interface as LoRANetwork for the trainer."""

    def __init__(self, roots: Mapping[str, nn.Module], targets: list[Target], algo: str, **kwargs):
        self.roots = dict(roots)
        self.targets = list(targets)
        self.algo = algo
        self.modules = {t.name: MODULES[algo](t, **kwargs) for t in self.targets}
        for m in self.modules.values():
            m.apply_to()

    def remove(self) -> None:
        """Unwrap every module's forward (the base model as it was)."""
        for m in self.modules.values():
            m.restore()

    def parameters(self, is_te: bool | None = None, part: str | None = None) -> list[nn.Parameter]:
        return [
            p
            for t in self.targets
            if (is_te is None or t.is_te == is_te) and (part is None or t.part == part)
            for p in self.modules[t.name].parameters()
        ]

    def set_multiplier(self, multiplier: float) -> None:
        for m in self.modules.values():
            m.multiplier = multiplier

    def to(self, device=None, dtype=None) -> LycorisNetwork:
        for m in self.modules.values():
            m.to(device=device, dtype=dtype)
        return self

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """`<kohya name>.<LyCORIS tensor name>` and `<kohya name>.alpha` for every module."""
        from ..transfer import tensors_to_cpu

        out = {}
        for name, m in self.modules.items():
            for key, p in m.tensors().items():
                out[f"{name}.{key}"] = p.detach().to(dtype or p.dtype)
            out[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=dtype or torch.float32)
        return tensors_to_cpu(out)  # one copy from the GPU, not one per tensor

    def load_kohya_state_dict(self, sd: dict[str, torch.Tensor], source: str = "network_weights") -> None:
        """Load a LyCORIS file written for this network; every key must match in name and shape."""
        from .lora import check_file_fits

        check_file_fits(
            self.kohya_state_dict(), sd, source, f"the file does not fit this {self.algo} network",
            "Use the file's algo, network_dim/conv_dim, preset, factor/decompose_both, dora_wd and train targets.",
            "set network_dim/conv_dim (and factor for LoKr) to the file's",
        )  # fmt: skip
        with torch.no_grad():
            for name, m in self.modules.items():
                for key, p in m.tensors().items():
                    p.copy_(sd[f"{name}.{key}"].to(p.dtype))
                m.alpha = float(sd[f"{name}.alpha"])

    @property
    def counts(self) -> tuple[int, int]:
        """(text-encoder modules, UNet modules), as kohya logs them."""
        te = sum(t.is_te for t in self.targets)
        return te, len(self.targets) - te
