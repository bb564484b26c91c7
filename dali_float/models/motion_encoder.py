"""The frozen LIA-style motion encoder: image -> identity latent s, coefficients lambda, motion latent r.

Laid out so that the state dict of `MotionEncoder` has the names and shapes of FLOAT's
`motion_autoencoder.enc.*` (appearance encoder `net_app` and motion head `fc`) and
`motion_autoencoder.dec.direction.weight` (the motion dictionary), so a user's own `float.pth`
loads without renaming anything by hand. The layers are written here from their definitions
(StyleGAN2 equalised learning rate, fused leaky ReLU, [1, 3, 3, 1] blur before each stride-2 conv).

Also here: reading a checkpoint file into a flat state dict and the strict key/shape check, shared
with `fmt.py` (one place for the CheckpointError wording).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dali_float.config import MotionEncoderConfig
from dali_float.errors import CheckpointError
from dali_float.models.torch_files import not_a_torch_checkpoint, torch_file_problem

log = logging.getLogger(__name__)

# Key prefixes inside FLOAT's float.pth (a flat state dict of the whole FLOAT model).
FLOAT_ENCODER_PREFIX = "motion_autoencoder.enc."
FLOAT_DIRECTION_KEY = "motion_autoencoder.dec.direction.weight"

_LEAKY_SLOPE = 0.2
_LEAKY_GAIN = math.sqrt(2.0)  # keeps the activations' variance after a leaky ReLU of slope 0.2
_BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)
_QR_EPS = 1e-8  # FLOAT adds this to the dictionary before its QR; kept so Q matches bit for bit
_SHOWN_KEYS = 3  # how many offending keys a CheckpointError lists per kind


# ----------------------------------------------------------------------------------------------
# Layers (equalised learning rate: weights stored N(0, 1), scaled by 1/sqrt(fan_in) at each call)
# ----------------------------------------------------------------------------------------------

class EqualConv2d(nn.Module):
    """Conv2d whose weight (out, in, k, k) is multiplied by 1/sqrt(in * k * k) at run time."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.stride = stride
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    """Linear layer whose weight (out, in) is multiplied by 1/sqrt(in) at run time; no activation."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = 1.0 / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class FusedLeakyReLU(nn.Module):
    """Per-channel bias (1, C, 1, 1), then leaky ReLU (0.2) times sqrt(2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias, _LEAKY_SLOPE) * _LEAKY_GAIN


class Blur(nn.Module):
    """Low-pass [1, 3, 3, 1] x [1, 3, 3, 1] filter (normalised, times `gain`) with padding (pad0, pad1)
    on each side.

    gain: 1 for a blur before a stride-2 conv; 4 (= factor^2) after a 2x upsampling that inserted zeros,
    so the mean value is kept. The kernel, gain included, is a persistent buffer because FLOAT's state
    dict has it (`...conv2.0.kernel`, `...upsample.kernel`).
    """

    def __init__(self, pad: tuple[int, int], gain: float = 1.0) -> None:
        super().__init__()
        taps = torch.tensor(_BLUR_TAPS)
        kernel = taps[:, None] * taps[None, :]
        self.register_buffer("kernel", kernel / kernel.sum() * gain)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        p0, p1 = self.pad
        x = F.pad(x, (p0, p1, p0, p1))
        # Depthwise: the same 2-D filter on every channel (flipped = true convolution; the kernel is symmetric).
        weight = torch.flip(self.kernel, (0, 1)).to(x.dtype).expand(channels, 1, *self.kernel.shape)
        return F.conv2d(x, weight, groups=channels)


class ConvLayer(nn.Sequential):
    """[Blur] -> EqualConv2d -> [FusedLeakyReLU]; indices 0/1/2 as in FLOAT's state dict.

    downsample: blur then a stride-2 conv without padding (halves the resolution).
    activate=False, bias=False: a bare (blurred) conv, used for the residual skip path.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, downsample: bool = False,
                 bias: bool = True, activate: bool = True) -> None:
        layers: list[nn.Module] = []
        if downsample:
            p = (len(_BLUR_TAPS) - 2) + (kernel_size - 1)
            layers.append(Blur(pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        # With an activation the bias lives in FusedLeakyReLU, not in the conv.
        layers.append(EqualConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                  bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_channels))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """Two 3x3 convs (the second halves the resolution) plus a blurred 1x1 skip, summed / sqrt(2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvLayer(in_channels, in_channels, 3)
        self.conv2 = ConvLayer(in_channels, out_channels, 3, downsample=True)
        self.skip = ConvLayer(in_channels, out_channels, 1, downsample=True, activate=False, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2.0)


class EncoderApp(nn.Module):
    """Appearance encoder: (N, 3, S, S) -> identity latent s (N, latent_dim).

    `convs`: a 1x1 ConvLayer 3 -> ch[S], ResBlocks S -> S/2 -> ... -> 4, then a 4x4 EqualConv2d
    without padding or bias down to 1x1 (float: 1 + 7 + 1 = 9 modules).
    """

    def __init__(self, cfg: MotionEncoderConfig) -> None:
        super().__init__()
        size = cfg.input_size
        self.convs = nn.ModuleList([ConvLayer(3, cfg.channels_at(size), 1)])
        in_channels = cfg.channels_at(size)
        resolution = size
        while resolution > 4:
            resolution //= 2
            out_channels = cfg.channels_at(resolution)
            self.convs.append(ResBlock(in_channels, out_channels))
            in_channels = out_channels
        self.convs.append(EqualConv2d(in_channels, cfg.latent_dim, 4, padding=0, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        return x.flatten(1)  # (N, latent_dim, 1, 1) -> (N, latent_dim)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(identity (N, latent_dim), skip features) for the decoder.

        The features are the outputs of every module but the last two (the 4x4 ResBlock and the final
        conv), from the coarsest to the finest: (N, ch[r], r, r) for r = 8, 16, ..., S (float: 7 maps,
        8x8x512 up to 512x512x32), as FLOAT's encoder hands them to its decoder. Kept only here: the
        plain forward frees each activation as it goes.
        """
        kept = []
        for conv in self.convs[:-1]:
            x = conv(x)
            kept.append(x)
        identity = self.convs[-1](x).flatten(1)
        return identity, kept[-2::-1]


class Direction(nn.Module):
    """The motion dictionary: `weight` (latent_dim, M); its QR's Q is an orthonormal basis of motion."""

    def __init__(self, latent_dim: int, num_coefficients: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(latent_dim, num_coefficients))

    def basis(self) -> torch.Tensor:
        """Q (latent_dim, M) float32, orthonormal columns. QR has no half kernel, so autocast is off."""
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            q, _ = torch.linalg.qr(self.weight.float() + _QR_EPS)
        return q

    def forward(self, coefficients: torch.Tensor) -> torch.Tensor:
        """lambda (N, M) -> r = lambda @ Q.T (N, latent_dim) float32, also under autocast (r is what is cached)."""
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            return coefficients.float() @ self.basis().T


# ----------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------

class MotionEncoding(NamedTuple):
    """What the motion encoder gives for N images (all float32)."""

    identity: torch.Tensor  # (N, F): identity latent s (F = latent_dim)
    coefficients: torch.Tensor  # (N, M): motion coefficients lambda = fc(s)
    motion_latents: torch.Tensor  # (N, F): motion latent r = Q lambda (FLOAT's x and its reference wr)


class ReferenceEncoding(NamedTuple):
    """What the decoder needs of a reference image, and its motion latent (float32 but the features)."""

    identity: torch.Tensor  # (N, F): identity latent s
    motion_latents: torch.Tensor  # (N, F): motion latent r of the reference (the FMT's wr)
    features: list[torch.Tensor]  # (N, ch[r], r, r) for r = 8 ... S, in the compute dtype


class MotionEncoder(nn.Module):
    """LIA encoder of FLOAT: `net_app` (appearance), `fc` (motion head), `direction` (dictionary).

    Without a checkpoint the weights are a seeded random init (`seed`, normally `preset.init_seed`),
    made with a private generator so the caller's RNG state is untouched.
    """

    def __init__(self, cfg: MotionEncoderConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.net_app = EncoderApp(cfg)
        # Four EqualLinear(F, F) with no activation between them (as in FLOAT), then F -> M.
        self.fc = nn.Sequential(*[EqualLinear(cfg.latent_dim, cfg.latent_dim) for _ in range(4)],
                                EqualLinear(cfg.latent_dim, cfg.num_coefficients))
        self.direction = Direction(cfg.latent_dim, cfg.num_coefficients)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Weights N(0, 1) (the equalised-lr convention), biases zero; deterministic in `seed`."""
        generator = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("weight"):
                param.copy_(torch.randn(param.shape, generator=generator))
            else:
                param.zero_()

    def basis(self) -> torch.Tensor:
        """Q (F, M) float32: the orthonormal motion basis; r = Q lambda."""
        return self.direction.basis()

    def forward(self, images: torch.Tensor) -> MotionEncoding:
        """images (N, 3, S, S) float in [-1, 1], S = cfg.input_size -> MotionEncoding (float32).

        Runs under autocast if the caller enabled it; the outputs are cast to float32.
        """
        self._check_images(images)
        identity = self.net_app(images)
        coefficients = self.fc(identity).float()
        motion_latents = self.direction(coefficients)
        return MotionEncoding(identity.float(), coefficients, motion_latents)

    def encode_reference(self, images: torch.Tensor) -> ReferenceEncoding:
        """images (N, 3, S, S) in [-1, 1] -> identity s, motion latent r and the decoder's skip features."""
        self._check_images(images)
        identity, features = self.net_app.forward_with_features(images)
        motion_latents = self.direction(self.fc(identity).float())
        return ReferenceEncoding(identity.float(), motion_latents, features)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1:] != (3, self.cfg.input_size, self.cfg.input_size):
            raise ValueError(f"MotionEncoder expects (N, 3, {self.cfg.input_size}, {self.cfg.input_size}) "
                             f"images, got {tuple(images.shape)}")


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Load a torch checkpoint file as a flat {name: tensor} dict (on the CPU, weights only).

    Unwraps {"state_dict": ...} and {"model": ...}. `what` names the checkpoint in error messages.
    Raises CheckpointError (one line) for a missing file or anything that is not a torch state dict.
    """
    return as_state_dict(read_torch_file(path, what), path, what)


def read_torch_file(path: Path, what: str) -> Any:
    """torch.load of `path` onto the CPU, tensors and plain Python only (weights_only); CheckpointError
    (one line) for a missing file or one torch cannot read. For callers that must look inside before
    knowing what the file is (`as_state_dict` then makes it a state dict)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} checkpoint {path} does not exist or is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a non-torch file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        kind = torch_file_problem(path) or f"torch cannot read it ({reason[:160]})"
        raise CheckpointError(not_a_torch_checkpoint(what, path, kind)) from None


def as_state_dict(obj: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    """What read_torch_file gave, as a flat {name: tensor} dict: {"state_dict": ...} and {"model": ...}
    unwrapped; CheckpointError (one line) when it is not a state dict of tensors."""
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{what} checkpoint {path} holds a {type(obj).__name__}, not a state dict of "
                              f"tensors; pass a state dict (or one wrapped in 'state_dict' / 'model')")
    return dict(obj)


def check_state_dict(path: Path, what: str, expected: Mapping[str, torch.Size],
                     found: Mapping[str, torch.Tensor], optional: frozenset[str] = frozenset(),
                     hint: str = "") -> None:
    """Strict key/shape check; one-line CheckpointError listing what is missing, unexpected, mismatched.

    expected: every key that must be present, with its shape. optional: keys that may be absent
    (constant buffers such as blur kernels) but must have the expected shape when present.
    """
    missing = [k for k in expected if k not in found and k not in optional]
    unexpected = [k for k in found if k not in expected]
    mismatched = [f"{k} expected {tuple(expected[k])} found {tuple(found[k].shape)}"
                  for k in found if k in expected and found[k].shape != expected[k]]
    if not (missing or unexpected or mismatched):
        return

    def _few(keys: list[str]) -> str:
        more = f", ... (+{len(keys) - _SHOWN_KEYS})" if len(keys) > _SHOWN_KEYS else ""
        return ", ".join(keys[:_SHOWN_KEYS]) + more

    parts = [f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} shape-mismatched keys"]
    if missing:
        parts.append(f"missing: {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected: {_few(unexpected)}")
    if mismatched:
        parts.append(f"mismatched: {_few(mismatched)}")
    raise CheckpointError(f"{what} checkpoint {path} does not fit: " + "; ".join(parts) + (f"; {hint}" if hint else ""))


def _to_encoder_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FLOAT's flat keys -> MotionEncoder keys; a MotionEncoder state dict is returned unchanged.

    In a FLOAT checkpoint only `motion_autoencoder.enc.*` and the direction weight are taken; the other
    keys (decoder, fmt, audio projection, ...) belong to other models and are ignored.
    """
    if not any(k.startswith(FLOAT_ENCODER_PREFIX) for k in state):
        return dict(state)
    mapped = {k[len(FLOAT_ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(FLOAT_ENCODER_PREFIX)}
    if FLOAT_DIRECTION_KEY in state:
        mapped["direction.weight"] = state[FLOAT_DIRECTION_KEY]
    return mapped


def load_motion_checkpoint(encoder: MotionEncoder, path: Path) -> MotionEncoder:
    """Load a FLOAT float.pth, or a MotionEncoder state dict, into `encoder` (strict); returns it.

    Every parameter must be present with its shape; the blur kernels (constant buffers) may be absent.
    Raises CheckpointError (one line: file, counts, first offending keys, what to do) otherwise.
    """
    path = Path(path)
    state = _to_encoder_keys(read_state_dict(path, "motion-encoder"))
    own = encoder.state_dict()
    buffers = frozenset(name for name, _ in encoder.named_buffers())
    check_state_dict(
        path, "motion-encoder", {k: v.shape for k, v in own.items()}, state, optional=buffers,
        hint=(f"expected FLOAT's float.pth ({FLOAT_ENCODER_PREFIX}* and {FLOAT_DIRECTION_KEY}) or a "
              f"MotionEncoder state dict for input_size {encoder.cfg.input_size} and latent_dim "
              f"{encoder.cfg.latent_dim} (float.pth needs --preset float)"))
    encoder.load_state_dict(state, strict=False)  # strictness checked above, buffers may be absent
    log.info("loaded motion encoder weights from %s (%d tensors)", path, len(state))
    return encoder
