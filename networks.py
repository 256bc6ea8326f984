"""The ground every stage stands on: denoiser networks, checkpoints, process set-up and teardown, the error exit.

- SongUNet: the DDPM++ U-Net in the configuration EDM trains it (Karras et al. 2022), with the same
  parameter names and shapes, so EDM's DDPM++ weights load into it one to one.
- PointMLP: a small residual MLP denoiser for 2-D (or D-dim) point data.
- EDMPrecond: EDM's preconditioning D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) around either.
- Checkpoints: plain dicts of tensors and python values, written atomically and read with weights_only=True.
  EDM/SiD `network-snapshot-*.pkl` files are read by a restricted unpickler that never runs the
  Python source those pickles carry (see the "EDM / SiD snapshots" section).

CLI:  python networks.py convert IN.pkl OUT.pt [--sigma S] [--sigma-init S] [--kind teacher|generator]
"""
import argparse
import collections
import io
import math
import os
import pickle
import re
import sys
import tempfile
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# What every stage shares: the one error exit and the torchrun set-up (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK).

def die(msg):
    """Bad input ends here: one 'error: ...' line on stderr, exit status 1, no traceback. Under torchrun every rank
    exits, but only rank 0 prints the line (or any process whose RANK is out of range, where no rank 0 runs)."""
    rank, world = int(os.environ.get('RANK', '0')), int(os.environ.get('WORLD_SIZE', '1'))
    raise SystemExit(f'error: {msg}' if rank == 0 or not 0 <= rank < world else 1)

def print0(*args, **kwargs):
    if int(os.environ.get('RANK', '0')) == 0:
        print(*args, **kwargs, flush=True)

def init_distributed(device=None):
    """(rank, world size, device): one process per GPU under torchrun, else one process on cuda or cpu."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank, local_rank = int(os.environ.get('RANK', '0' if world == 1 else '-1')), int(os.environ.get('LOCAL_RANK', '0'))
    if not 0 <= rank < world:     # left over from another launch: this process would train on an empty share
        die(f'RANK={os.environ.get("RANK")} with WORLD_SIZE={world}: launch with torchrun, or unset both (one process)')
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and not torch.cuda.is_available():
        die(f'--device {device}: no CUDA GPU is visible to torch here; use --device cpu')
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world, device

def end_distributed(world):
    """The last barrier, then teardown. The barrier's handle stays here for the exiting interpreter to free: under DDP,
    a gloo thread that frees it as Python shuts down aborts the process ("terminate called without an active ...")."""
    if world > 1:
        end_distributed.barrier = dist.barrier(async_op=True)
        end_distributed.barrier.wait()
        dist.destroy_process_group()

# ------------------------------------------------------------------------------------------------
# Layers. EDM's DDPM++ initialises every weight xavier-uniform, scaled by 1 (most layers), 1e-5 (the last conv of each
# residual branch and the output conv: every block starts near identity) or sqrt(0.2) (attention qkv); biases at 0.

def conv(cin, cout, kernel, gain=1.0):
    layer = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    nn.init.xavier_uniform_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer

def linear(cin, cout, bias=True, gain=1.0):
    layer = nn.Linear(cin, cout, bias=bias)
    nn.init.xavier_uniform_(layer.weight, gain)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer

def group_norm(channels):
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-6)  # EDM: >= 4 channels per group

SKIP_SCALE = math.sqrt(0.5)  # keeps the variance of (branch + skip) near that of its inputs

class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [sin, cos] of a scalar per sample, frequencies (1/10000)^(i/(C/2-1))."""
    def __init__(self, num_channels, scale=1.0):
        super().__init__()
        self.num_channels, self.scale = num_channels, scale

    def forward(self, x):
        half = self.num_channels // 2
        freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32, device=x.device) / (half - 1))
        x = torch.outer(x * self.scale, freqs.to(x.dtype))
        return torch.cat([x.sin(), x.cos()], dim=1)

class UNetBlock(nn.Module):
    """Residual block of DDPM++: GN-SiLU-conv, + embedding bias, GN-SiLU-dropout-conv, optional 1-head attention.
    Resampling uses the [1,1] filter: a 2x2 average to go down, nearest-neighbour copies to go up."""
    def __init__(self, cin, cout, emb_channels, up=False, down=False, attention=False, dropout=0.0):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.up, self.down, self.attention, self.dropout = up, down, attention, dropout
        self.norm0 = group_norm(cin)
        self.conv0 = conv(cin, cout, 3)
        self.affine = linear(emb_channels, cout)
        self.norm1 = group_norm(cout)
        self.conv1 = conv(cout, cout, 3, gain=1e-5)
        self.skip = conv(cin, cout, 1) if (cin != cout or up or down) else None
        if attention:
            self.norm2 = group_norm(cout)
            self.qkv = conv(cout, 3 * cout, 1, gain=math.sqrt(0.2))
            self.proj = conv(cout, cout, 1, gain=1e-5)

    def resample(self, x):
        if self.down:
            return F.avg_pool2d(x, 2)
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode='nearest')
        return x

    def forward(self, x, emb):
        h = self.conv0(self.resample(F.silu(self.norm0(x))))
        h = F.silu(self.norm1(h.add_(self.affine(emb)[:, :, None, None])))
        h = self.conv1(F.dropout(h, self.dropout, self.training))
        x = h.add_(self.skip(self.resample(x)) if self.skip is not None else x).mul_(SKIP_SCALE)
        if self.attention:
            n, c, hh, ww = x.shape
            # qkv channels are interleaved (c0q, c0k, c0v, c1q, ...) as in EDM's layout
            q, k, v = self.qkv(self.norm2(x)).reshape(n, c, 3, hh * ww).unbind(2)
            # softmax over keys of q.k/sqrt(c); bmm on these strided views saves no copies for backward
            w = torch.baddbmm(q.new_empty(()), q.transpose(1, 2), k, beta=0, alpha=c ** -0.5).softmax(dim=2)
            a = torch.bmm(v, w.transpose(1, 2))  # (n, c, hw)
            x = self.proj(a.reshape(n, c, hh, ww)).add_(x).mul_(SKIP_SCALE)
        return x

class SongUNet(nn.Module):
    """DDPM++ U-Net. Module names follow EDM's SongUNet (map_*, enc['RxR_conv'/'_down'/'_blockI'],
    dec['RxR_in0'/'_in1'/'_up'/'_blockI'/'_aux_norm'/'_aux_conv']) so state dicts are interchangeable."""
    def __init__(self, img_resolution, in_channels, out_channels, augment_dim=0, model_channels=128,
                 channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), dropout=0.1):
        super().__init__()
        emb = 4 * model_channels
        blk = dict(emb_channels=emb, dropout=dropout)
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = linear(model_channels, emb)
        self.map_layer1 = linear(emb, emb)
        self.enc = nn.ModuleDict()
        skips, cout = [], in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f'{res}x{res}_conv'] = conv(cout, model_channels, 3)
                cout = model_channels
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **blk)
            skips.append(cout)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{i}'] = UNetBlock(cin, cout, attention=res in attn_resolutions, **blk)
                skips.append(cout)
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **blk)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **blk)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **blk)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = i == num_blocks and res in attn_resolutions
                self.dec[f'{res}x{res}_block{i}'] = UNetBlock(cin, cout, attention=attn, **blk)
        self.dec[f'{img_resolution}x{img_resolution}_aux_norm'] = group_norm(cout)
        self.dec[f'{img_resolution}x{img_resolution}_aux_conv'] = conv(cout, out_channels, 3, gain=1e-5)

    def forward(self, x, noise_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        *blocks, aux_norm, aux_conv = self.dec.values()
        for block in blocks:
            if block.in_channels != x.shape[1]:  # the decoder's _blockI take the matching encoder output
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return aux_conv(F.silu(aux_norm(x)))

class PointMLP(nn.Module):
    """Residual MLP denoiser for points (N, dim): width `width`, `depth` residual blocks, each biased by an
    embedding of the noise level (and of augment labels, if any)."""
    def __init__(self, dim, width=256, depth=4, augment_dim=0, dropout=0.0):
        super().__init__()
        self.dropout = dropout
        self.map_noise = PositionalEmbedding(width, scale=100.0)  # c_noise spans a few units: spread it out
        self.map_augment = linear(augment_dim, width, bias=False) if augment_dim else None
        self.map_layer0 = linear(width, width)
        self.inp = linear(dim, width)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(norm=nn.LayerNorm(width), fc0=linear(width, width),
                                                       affine=linear(width, width), fc1=linear(width, width, gain=1e-5)))
                                    for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = linear(width, dim, gain=1e-5)

    def forward(self, x, noise_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        h = self.inp(x)
        for b in self.blocks:
            y = F.silu(b['fc0'](F.silu(b['norm'](h))) + b['affine'](emb))
            h = h + b['fc1'](F.dropout(y, self.dropout, self.training))
        return self.out(F.silu(self.out_norm(h)))

class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma)/4), sigma_data = 0.5 (EDM, Table 1)."""
    def __init__(self, img_resolution, img_channels, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                 attn_resolutions=(16,), dropout=0.13, augment_dim=9, arch='songunet', sigma_data=0.5):
        super().__init__()
        self.config = dict(img_resolution=int(img_resolution), img_channels=int(img_channels),
                           model_channels=int(model_channels), channel_mult=[int(m) for m in channel_mult],
                           num_blocks=int(num_blocks), attn_resolutions=[int(r) for r in attn_resolutions],
                           dropout=float(dropout), augment_dim=int(augment_dim), arch=str(arch), sigma_data=float(sigma_data))
        self.img_resolution, self.img_channels, self.sigma_data = int(img_resolution), int(img_channels), float(sigma_data)
        if arch == 'songunet':
            self.model = SongUNet(img_resolution, img_channels, img_channels, augment_dim, model_channels,
                                  channel_mult, num_blocks, attn_resolutions, dropout)
        elif arch == 'mlp':
            self.model = PointMLP(img_channels, model_channels, num_blocks, augment_dim, dropout)
        else:
            raise ValueError(f"unknown arch {arch!r}; use 'songunet' (images) or 'mlp' (points)")
        # EDM state dicts also hold the fixed [1,1] resampling filters; ours has none, so drop them on load
        self.register_load_state_dict_pre_hook(_drop_resample_filters)

    def forward(self, x, sigma, augment_labels=None):
        # fp32 throughout (as EDM); fp64 only when both the input and the weights are fp64 (exactness checks)
        double = x.dtype == torch.float64 and next(self.parameters()).dtype == torch.float64
        dtype = torch.float64 if double else torch.float32
        x = x.to(dtype)
        sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        elif sigma.numel() != x.shape[0]:
            raise ValueError(f'sigma has {sigma.numel()} values for a batch of {x.shape[0]}; give one or one per sample')
        s = sigma.reshape(-1, *[1] * (x.ndim - 1))
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (s ** 2 + sd2)
        c_out = s * self.sigma_data / (s ** 2 + sd2).sqrt()
        c_in = 1 / (s ** 2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        if augment_labels is not None:
            augment_labels = augment_labels.to(device=x.device, dtype=dtype)
        F_x = self.model(c_in * x, c_noise, augment_labels)
        return c_skip * x + c_out * F_x.to(dtype)

def _drop_resample_filters(module, state_dict, prefix, *args):
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith('.resample_filter')]:
        del state_dict[key]

# ------------------------------------------------------------------------------------------------
# Presets: EDMPrecond kwargs and Phase I defaults (kimg, warmup, ema in thousands of images). Sources: cifar10 is
# EDM's train.py defaults for --arch=ddpmpp (batch 512, lr 10e-4, dropout 0.13, augment 0.12, duration 200 Mimg) with
# training_loop.py's lr_rampup_kimg 10000 and ema_rampup_ratio 0.05; ffhq64 / afhq64 are EDM's README.md commands
# "--batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 (AFHQv2: 0.25) --augment=0.15"; celebahq64 (no EDM recipe)
# takes RSD's run_bash/pretrain.sh dropout 0.15; 64x64 length is the paper's 100 Mimg. tiny / toy are CPU-sized.
_DDPMPP = dict(img_channels=3, model_channels=128, num_blocks=4, attn_resolutions=[16], augment_dim=9, arch='songunet')
_NET64 = dict(_DDPMPP, img_resolution=64, channel_mult=[1, 2, 2, 2])
_TRAIN64 = dict(batch=256, lr=2e-4, kimg=100000, warmup=10000, ema=500, ema_rampup=0.05, augment=0.15)
PRESETS = dict(
    cifar10=dict(net=dict(_DDPMPP, img_resolution=32, channel_mult=[2, 2, 2], dropout=0.13),
                 train=dict(batch=512, lr=1e-3, kimg=200000, warmup=10000, ema=500, ema_rampup=0.05, augment=0.12)),
    ffhq64=dict(net=dict(_NET64, dropout=0.05), train=dict(_TRAIN64)),
    afhq64=dict(net=dict(_NET64, dropout=0.25), train=dict(_TRAIN64)),
    celebahq64=dict(net=dict(_NET64, dropout=0.15), train=dict(_TRAIN64)),
    tiny=dict(net=dict(img_resolution=16, img_channels=3, model_channels=32, channel_mult=[1, 2], num_blocks=1,
                       attn_resolutions=[8], dropout=0.0, augment_dim=9, arch='songunet'),
              train=dict(batch=64, lr=3e-4, kimg=240, warmup=2, ema=20, ema_rampup=0.05, augment=0.0)),
    toy=dict(net=dict(img_resolution=0, img_channels=2, model_channels=128, channel_mult=[1], num_blocks=3,
                      attn_resolutions=[], dropout=0.0, augment_dim=0, arch='mlp'),
             train=dict(batch=512, lr=1e-3, kimg=3000, warmup=50, ema=50, ema_rampup=0.05, augment=0.0),
             loss='ambient-x0'),   # Eq. (3) reweighted: bench/RECIPES.md, "Where the teacher learns least"
)

_NET_KEYS = ('img_resolution', 'img_channels', 'model_channels', 'channel_mult', 'num_blocks', 'attn_resolutions',
             'dropout', 'augment_dim', 'arch', 'sigma_data')

def build_net(net_config):
    """EDMPrecond from a config dict (a preset's 'net' or a checkpoint's 'net'), with one-line errors."""
    if not isinstance(net_config, dict):
        die(f'net config must be a dict, got {type(net_config).__name__}')
    unknown = sorted(set(net_config) - set(_NET_KEYS))
    missing = [k for k in ('img_resolution', 'img_channels') if k not in net_config]
    if unknown or missing:
        die(f"net config: {'unknown keys ' + str(unknown) if unknown else 'missing ' + str(missing)}; "
            f"allowed keys: {', '.join(_NET_KEYS)}")
    if net_config.get('arch', 'songunet') not in ('songunet', 'mlp'):
        die(f"net config: unknown arch {net_config['arch']!r}; use 'songunet' or 'mlp'")
    return EDMPrecond(**net_config)

# ------------------------------------------------------------------------------------------------
# Checkpoints (format 'dsd-1'): only tensors and python primitives, so torch.load(weights_only=True) reads them.

def _check_plain(obj, where='ckpt'):
    if isinstance(obj, (dict, list, tuple)):
        for k, v in obj.items() if isinstance(obj, dict) else enumerate(obj):
            if not isinstance(k, (str, int)):
                raise TypeError(f'save_checkpoint: {where} has a key of type {type(k).__name__}; use str keys')
            _check_plain(v, f'{where}[{k!r}]')
    elif not (obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor))):
        raise TypeError(f'save_checkpoint: {where} is {type(obj).__module__}.{type(obj).__name__}; '
                        f'store only tensors and python int/float/str/bool/None/list/dict')

def save_checkpoint(path, ckpt):
    """Write ckpt atomically: a temp file in the same folder, flushed and fsynced, then renamed over `path`."""
    _check_plain(ckpt)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable; not every filesystem lets a folder be fsynced
        dfd = os.open(folder, os.O_RDONLY)
        os.fsync(dfd), os.close(dfd)
    except OSError:
        pass

def load_checkpoint(path, sigma_n=None, sigma_init=None, kind=None):
    """Read a 'dsd-1' checkpoint (weights_only). An EDM/SiD `.pkl` snapshot is converted in memory;
    sigma_n, sigma_init and kind only apply to that conversion (a .pt file records its own values)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        die(f'{path}: no such checkpoint file')
    with open(path, 'rb') as f:
        head = f.read(4)
    if path.endswith('.pkl') and not head.startswith(b'PK'):  # torch's zip files start with 'PK'
        return convert_snapshot(path, sigma_n=sigma_n, sigma_init=sigma_init, kind=kind)
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch's refusal advises an unsafe retry: never relay it
        if 'weights only' in str(e).lower() and head.startswith((b'PK', b'\x80')):   # a zip or a pickle
            die(f'{path}: refused: it holds Python objects besides tensors and plain values, and loading those could '
                f'run code; DSD checkpoints hold none (EDM/SiD .pkl files: `python networks.py convert IN.pkl OUT.pt`)')
        die(f'{path}: not a readable torch checkpoint ({type(e).__name__}); truncated, or not a .pt file')
    if not isinstance(ckpt, dict) or ckpt.get('format') != 'dsd-1':
        die(f"{path}: not a DSD checkpoint (expected a dict with format 'dsd-1'); convert EDM/SiD .pkl files with "
            "`python networks.py convert IN.pkl OUT.pt`")
    lacks = [k for k in ['kind', 'net', 'ema', 'sigma_n', 'loss'] + ['sigma_init'] * (ckpt.get('kind') == 'generator')
             if k not in ckpt]
    if lacks or not all(v.isfinite().all() for v in ckpt['ema'].values() if v.is_floating_point()):   # never garbage
        die(f'{path}: damaged ({"no " + ", ".join(lacks) if lacks else "non-finite weights"}); use another snapshot')
    return ckpt

# ------------------------------------------------------------------------------------------------
# EDM / SiD snapshots. EDM pickles each network module as a call to torch_utils.persistence's reconstruct function with
# one dict: {type:'class', version, module_src: the source of the module that defined the class, class_name, state: the
# module's __dict__ (_parameters, _buffers, _modules, attrs, _init_kwargs)}. EDM's loader exec()s module_src --
# arbitrary code. We unpickle with an allow-list: that reconstruct call becomes _Stub(class_name, state) and module_src
# is never looked at; tensors come from torch's own rebuild paths (storages via torch.load(weights_only=True)); anything
# else is refused. EDM snapshot: dict(ema=EDMPrecond, loss_fn, augment_pipe, dataset_kwargs); SiD/DSD generator
# snapshot: dict(ema=EDMPrecond), saved as network-snapshot-<alpha>-<kimg>.pkl.

class _Refused(Exception):
    pass

class _Stub:
    """What a pickled module becomes here: its class name and attribute dict, nothing callable."""
    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state

    def __setstate__(self, state):  # torch containers arrive via NEWOBJ + BUILD
        self.state = state if isinstance(state, dict) else {}

class _ModuleDictStub(_Stub):
    class_name = 'ModuleDict'
    def __init__(self):
        self.state = {}

class _EasyDict(dict):
    pass

def _persistent_stub(meta):
    if not (isinstance(meta, dict) and meta.get('type') == 'class' and isinstance(meta.get('class_name'), str)
            and isinstance(meta.get('state'), dict)):
        raise _Refused('malformed persistent-object record')
    return _Stub(meta['class_name'], meta['state'])  # meta['module_src'] is deliberately ignored

def _storage_from_bytes(data):
    if not isinstance(data, bytes):
        raise _Refused('storage record is not bytes')
    storage = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage):
        raise _Refused('storage record does not hold a storage')
    return storage

def _tensor(storage, offset, size, stride, *unused):  # requires_grad / backward hooks / metadata are ignored
    if not isinstance(storage, torch.storage.TypedStorage):
        raise _Refused('tensor record does not reference a storage')
    return torch.tensor([], dtype=storage.dtype).set_(storage.untyped(), offset, tuple(size), tuple(stride))

def _parameter(data, requires_grad=True, *unused):
    if not isinstance(data, torch.Tensor):
        raise _Refused('parameter record does not hold a tensor')
    return nn.Parameter(data, requires_grad=bool(requires_grad))

def _from_type(func, new_type, args, state):
    if func not in (_tensor, _parameter) or new_type not in (torch.Tensor, nn.Parameter):
        raise _Refused('unexpected tensor subclass record')
    return func(*args)

def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise _Refused('unexpected numpy scalar record')
    return np.frombuffer(data, dtype=dtype)[0].item()

_ALLOWED = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _persistent_stub,
    ('torch.storage', '_load_from_bytes'): _storage_from_bytes,
    ('torch._utils', '_rebuild_tensor_v2'): _tensor, ('torch._utils', '_rebuild_tensor'): _tensor,
    ('torch._utils', '_rebuild_parameter'): _parameter, ('torch._utils', '_rebuild_parameter_with_state'): _parameter,
    ('torch._tensor', '_rebuild_from_type_v2'): _from_type,
    ('torch._tensor', 'Tensor'): torch.Tensor, ('torch', 'Tensor'): torch.Tensor,
    ('torch.nn.parameter', 'Parameter'): nn.Parameter, ('torch.nn.modules.container', 'ModuleDict'): _ModuleDictStub,
    ('collections', 'OrderedDict'): collections.OrderedDict, ('numpy', 'dtype'): np.dtype,
    ('builtins', 'set'): set, ('builtins', 'frozenset'): frozenset, ('dnnlib.util', 'EasyDict'): _EasyDict,
    ('numpy.core.multiarray', 'scalar'): _np_scalar, ('numpy._core.multiarray', 'scalar'): _np_scalar,
}

class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise _Refused(f'refusing to load: the pickle asks for {module}.{name}, which is not on the allow-list '
                           f'(only EDM-format network snapshots are read)')
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid):
        raise _Refused('refusing to load: unexpected persistent id in the pickle')

def _read_snapshot(path):
    try:
        with open(path, 'rb') as f, warnings.catch_warnings():
            warnings.simplefilter('ignore')  # TypedStorage deprecation chatter
            obj = _SafeUnpickler(f).load()
    except _Refused as e:
        die(f'{path}: {e}')
    except Exception as e:  # EOFError, UnpicklingError, ...: any failure here means the bytes are bad
        die(f'{path}: truncated or corrupt pickle ({type(e).__name__}: {str(e)[:160]})')
    return obj

def _modules(stub):
    mods = stub.state.get('_modules') or {}
    for k, m in mods.items():
        if m is not None and not isinstance(m, _Stub):
            raise _Refused(f'submodule {k!r} is not a network module')
    return mods

def _params(stub, prefix=''):
    """name -> tensor over the module tree, in state_dict order; EDM's fixed resample_filter buffers skipped."""
    out = collections.OrderedDict()
    for group in ('_parameters', '_buffers'):
        for k, v in (stub.state.get(group) or {}).items():
            if v is None or (group == '_buffers' and k == 'resample_filter'):
                continue
            if not isinstance(v, torch.Tensor):
                raise _Refused(f'{prefix}{k} is not a tensor')
            out[prefix + k] = v.detach()
    for k, m in _modules(stub).items():
        if m is not None:
            out.update(_params(m, f'{prefix}{k}.'))
    return out

def _ddpmpp_config(ema):
    """EDMPrecond kwargs for an EDM EDMPrecond(SongUNet DDPM++) stub; _Refused naming what differs otherwise."""
    only = 'only EDMPrecond around SongUNet in its DDPM++ form is supported'
    if ema.class_name != 'EDMPrecond':
        raise _Refused(f"the network ('ema') is {ema.class_name}, not EDMPrecond; {only}")
    st = ema.state
    model = _modules(ema).get('model')
    if model is None or model.class_name != 'SongUNet':
        name = model.class_name if model is not None else 'nothing'
        raise _Refused(f'EDMPrecond wraps {name}{" (ADM)" * (name == "DhariwalUNet")}; {only}')
    if st.get('label_dim'):
        raise _Refused(f"class-conditional network (label_dim={st['label_dim']}); {only}, unconditional")
    kw = model.state.get('_init_kwargs') or {}
    for key, want in (('embedding_type', 'positional'), ('encoder_type', 'standard'), ('decoder_type', 'standard'),
                      ('channel_mult_noise', 1), ('resample_filter', [1, 1]), ('channel_mult_emb', 4)):
        if key in kw and (list(kw[key]) if isinstance(kw[key], (list, tuple)) else kw[key]) != want:
            raise _Refused(f'SongUNet with {key}={kw[key]!r} (NCSN++ or a variant); {only} ({key}={want!r})')
    mods = _modules(model)
    noise = mods.get('map_noise')
    if (noise is None or noise.class_name != 'PositionalEmbedding' or not noise.state.get('endpoint', True)
            or noise.state.get('max_positions', 10000) != 10000):
        raise _Refused(f"SongUNet with {noise.class_name if noise else 'no'} noise embedding (NCSN++); {only}")
    if 'enc' not in mods or 'dec' not in mods:
        raise _Refused(f'SongUNet without enc/dec; {only}')
    enc = _modules(mods['enc'])  # a different decoder or resampling shows as a shape mismatch on load
    res = int(st.get('img_resolution', 0))
    first = enc.get(f'{res}x{res}_conv')
    if first is None or 'weight' not in (first.state.get('_parameters') or {}):
        raise _Refused(f'no {res}x{res}_conv input layer; {only}')
    model_channels, img_channels = first.state['_parameters']['weight'].shape[:2]
    mult, level = [], 0
    while f'{res >> level}x{res >> level}_block0' in enc:
        r = res >> level
        mult.append(_params(enc[f'{r}x{r}_block0'])['conv0.weight'].shape[0] // model_channels)
        level += 1
    num_blocks = sum(1 for k in enc if re.fullmatch(f'{res}x{res}_block\\d+', k))
    attn = sorted({int(k.split('x')[0]) for k, b in enc.items() if 'qkv' in _modules(b)})
    aug = _params(mods['map_augment'])['weight'].shape[1] if mods.get('map_augment') is not None else 0
    dropout = float(next(iter(b.state.get('dropout', 0.0) for k, b in enc.items() if '_block' in k), 0.0))
    return dict(img_resolution=res, img_channels=int(img_channels), model_channels=int(model_channels),
                channel_mult=mult, num_blocks=num_blocks, attn_resolutions=attn, dropout=dropout,
                augment_dim=int(aug), arch='songunet', sigma_data=float(st.get('sigma_data', 0.5)))

def convert_snapshot(path, sigma_n=None, sigma_init=None, kind=None):
    """A 'dsd-1' checkpoint dict from an EDM (teacher) or SiD/DSD (generator) network-snapshot .pkl."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        die(f'{path}: no such file')
    snap = _read_snapshot(path)
    if not isinstance(snap, dict) or not isinstance(snap.get('ema'), _Stub):
        die(f"{path}: not an EDM/SiD network snapshot (expected a dict whose 'ema' is a network, got "
                   f"{type(snap).__name__}{' with keys ' + str(sorted(map(str, snap))) if isinstance(snap, dict) else ''})")
    try:
        config = _ddpmpp_config(snap['ema'])
        net = EDMPrecond(**config)
        ours, theirs = net.state_dict(), _params(snap['ema'])
        for k in list(ours) + list(theirs):
            if k not in ours or k not in theirs or ours[k].shape != theirs[k].shape:
                got = tuple(theirs[k].shape) if k in theirs else 'missing'
                want = tuple(ours[k].shape) if k in ours else 'not part of DDPM++'
                raise _Refused(f'tensor {k}: snapshot has {got}, DDPM++ {config} needs {want}')
        net.load_state_dict(theirs, strict=True)
    except _Refused as e:
        die(f'{path}: {e}')
    except Exception as e:  # a module tree shaped unlike any EDM network
        die(f'{path}: not an EDM DDPM++ network layout ({type(e).__name__}: {str(e)[:160]})')
    name = os.path.basename(path)
    sid_name = re.fullmatch(r'network-snapshot-\d+\.\d+-(\d+)\.pkl', name)
    edm_name = re.fullmatch(r'network-snapshot-(\d+)\.pkl', name)
    guessed = 'generator' if (set(snap) == {'ema'} and sid_name) else 'teacher'
    from_flags = [k for k, v in (('kind', kind), ('sigma_n', sigma_n), ('sigma_init', sigma_init)) if v is not None]
    kind = kind or guessed
    dk = snap.get('dataset_kwargs')
    data = os.path.splitext(os.path.basename(str(dk.get('path', ''))))[0] if isinstance(dk, dict) else ''
    m = sid_name or edm_name
    ckpt = dict(format='dsd-1', kind=kind, net=net.config,
                ema={k: v.detach().clone() for k, v in net.state_dict().items()},
                sigma_n=float(sigma_n) if sigma_n is not None else 0.0, kimg=float(m.group(1)) if m else 0.0,
                loss='ambient' if sigma_n is not None else 'standard', data=data or 'unknown',
                converted=dict(source=name, snapshot_keys=sorted(map(str, snap)), guessed_kind=guessed,
                               from_flags=from_flags))
    if kind == 'generator':
        ckpt.update(sigma_init=float(sigma_init) if sigma_init is not None else 2.5, teacher=dict(net.config))
    return ckpt

# ------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description='Convert an EDM/SiD network-snapshot .pkl into a safe DSD checkpoint '
                                            '(the pickle is read with an allow-list; its embedded code never runs).')
    sub = p.add_subparsers(dest='cmd', required=True)
    c = sub.add_parser('convert', help='IN.pkl -> OUT.pt')
    c.add_argument('inp', metavar='IN.pkl')
    c.add_argument('out', metavar='OUT.pt')
    c.add_argument('--sigma', type=float, default=None, help='noise level sigma_n of the data the teacher saw '
                                                              "(default 0, loss 'standard'; given: loss 'ambient')")
    c.add_argument('--sigma-init', type=float, default=None, help='generator input noise scale (default 2.5)')
    c.add_argument('--kind', choices=['teacher', 'generator'], default=None,
                   help='default: generator for SiD-style network-snapshot-<alpha>-<kimg>.pkl holding only ema')
    a = p.parse_args(argv)
    for flag, v, low in (('--sigma', a.sigma, 0), ('--sigma-init', a.sigma_init, 1e-12)):
        if v is not None and not (low <= v < math.inf):
            die(f'{flag} {v}: must be a finite number >= {low:g}')
    ckpt = convert_snapshot(a.inp, sigma_n=a.sigma, sigma_init=a.sigma_init, kind=a.kind)
    save_checkpoint(a.out, ckpt)
    n = sum(v.numel() for v in ckpt['ema'].values())
    print(f"{a.out}: {ckpt['kind']}, {n / 1e6:.2f}M parameters, net {ckpt['net']}, sigma_n {ckpt['sigma_n']}, "
          f"loss {ckpt['loss']}" + (f", sigma_init {ckpt['sigma_init']}" if ckpt['kind'] == 'generator' else ''))

if __name__ == '__main__':
    main()
