"""Frechet Inception Distance (FID), Proximal FID, a weight-free pixel Frechet distance, and the paper's figures.

FID compares the Gaussians fitted to 2048-d Inception-v3 pool3 features of two image sets:
    FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))
The network is the TF 2015-12-05 Inception used by every published FID, loaded from its PyTorch port
pt_inception-2015-12-05-6726825d.pth; images go in as uint8 and are resized to 299x299 as pytorch-fid does, so its
.npz files (and, across ports, EDM's cifar10-32x32.npz: see README) can be compared against.
Without the weights file, `--features pixel` uses flattened pixels scaled to [-1, 1] (the data space the models
train in) as features: "pixel FD", not comparable with FID; stats files record their kind, so the two never mix.

    python fid.py ref  --data cifar10 --out refs/cifar10.npz                 # clean training set
    python fid.py ref  --data cifar10 --sigma 0.2 --out refs/cifar10-n0.2.npz  # the teacher's noisy set
    python fid.py calc --images samples/ --ref refs/cifar10.npz              # PNG folder or .npz 'samples'
    python fid.py calc --net gen.pt --num 50000 --ref refs/cifar10.npz --repeats 3
    python fid.py calc --net gen.pt --proximal --ref refs/cifar10-n0.2.npz   # model selection, no clean data
    python fid.py figure --net teacher.pt --generator gen.pt --out fig.png   # the paper's Fig. 2 / Fig. 4
    torchrun --standalone --nproc_per_node=8 fid.py calc --net gen.pt --ref refs/cifar10.npz
"""
import argparse
import hashlib
import json
import os
import sys
import urllib.request
import warnings

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.spatial
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

from networks import die, init_distributed, print0
from pretrain import (BUILTIN, builtin_clean, check_ranges, load_data, load_images, make_noisy, noisy_dataset,
                      toy_curve)
from sample import generate, grid_image, load_net, sample_shape, scatter, to_uint8, writable_image

WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + WEIGHTS_NAME
WEIGHTS_SHA256 = '6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2'  # the name holds its first 8
LABEL = {'inception': 'FID', 'pixel': 'pixel FD'}
PROXIMAL_STREAM = 1  # Proximal FID's noise: a stream of make_noisy that no training item draws from

def label_of(kind, points=False):          # points' 'pixel' features are Fourier features (see sample_features)
    return 'FD (Fourier features)' if points and kind == 'pixel' else LABEL[kind]

# ----------------------------------------------------------------------------------------------
# The FID Inception-v3. Attribute names follow the weights file so its state dict loads as is.
# It differs from torchvision's ImageNet Inception-v3 where the TF graph differs: the average pools inside
# the blocks ignore padded zeros, the last block (Mixed_7c) max-pools, and the classifier has 1008 classes.

class ConvBN(nn.Module):
    """Conv without bias, batch norm (TF's eps 1e-3), ReLU."""
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        if self.training:
            return F.relu(self.bn(self.conv(x)))
        # Frozen BN is an affine map per channel: fold it into the conv, saving a pass over the activations.
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        return F.relu(F.conv2d(x, self.conv.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale,
                               self.conv.stride, self.conv.padding))

def _avg_pool(x):
    # TF's average pool divides by the number of real pixels under the window, not by 9 at the border.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1."""
    def __init__(self, cin, pool_ch):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_ch, 1)

    def forward(self, x):
        b = self.branch5x5_2(self.branch5x5_1(x))
        d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b, d, self.branch_pool(_avg_pool(x))], 1)

class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), d, F.max_pool2d(x, 3, stride=2)], 1)

class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 then 7x1)."""
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        return torch.cat([self.branch1x1(x), b, d, self.branch_pool(_avg_pool(x))], 1)

class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1)

class InceptionE(nn.Module):
    """8x8 block whose 3x3 branches split into parallel 1x3 and 3x1 halves. `pool` is 'avg' for Mixed_7b
    and 'max' for Mixed_7c (the TF graph's choice; the ImageNet Inception averages in both)."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        p = _avg_pool(x) if self.pool == 'avg' else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b), self.branch3x3_2b(b), self.branch3x3dbl_3a(d),
                          self.branch3x3dbl_3b(d), self.branch_pool(p)], 1)

class InceptionV3(nn.Module):
    """FID Inception-v3: images NCHW, uint8 or float in [0, 255], any size -> (N, 2048) pool3 features."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, 'avg')
        self.Mixed_7c = InceptionE(2048, 'max')
        self.fc = nn.Linear(2048, 1008)  # the 1008-way classifier; unused, kept so the file loads strictly
        # NHWC layout: about 1.5x faster convolutions on CPU (oneDNN); load_state_dict keeps the layout.
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        # Same order of operations as the reference scorer: /255, bilinear resize in [0, 1], then to [-1, 1].
        x = x.to(torch.float32) / 255
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        x = (2 * x - 1).contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

def file_sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()

def find_weights(path=None, download=True, timeout=60):
    """Path of the weights file: `path` if given, else $DSD_DATA/ or torch hub's checkpoints/; if in none,
    one download attempt into the hub cache; else a one-line error saying where to put the file."""
    if path:
        if not os.path.isfile(path):
            die(f'--inception {path}: no such file; pass the path of {WEIGHTS_NAME}')
        return path
    hub_dir = os.path.join(torch.hub.get_dir(), 'checkpoints')
    dirs = [d for d in (os.environ.get('DSD_DATA'), hub_dir) if d]
    for d in dirs:
        if os.path.isfile(os.path.join(d, WEIGHTS_NAME)):
            return os.path.join(d, WEIGHTS_NAME)
    dest = os.path.join(hub_dir, WEIGHTS_NAME)
    why = 'not downloaded'
    if download:
        tmp = f'{dest}.{os.getpid()}.part'
        try:
            os.makedirs(hub_dir, exist_ok=True)
            print(f'downloading {WEIGHTS_URL} -> {dest}', file=sys.stderr)
            with urllib.request.urlopen(WEIGHTS_URL, timeout=timeout) as r, open(tmp, 'wb') as f:
                for chunk in iter(lambda: r.read(1 << 20), b''):
                    f.write(chunk)
            if file_sha256(tmp) != WEIGHTS_SHA256:  # a broken or wrong transfer never lands in the cache
                raise OSError('sha256 mismatch')
            os.replace(tmp, dest)
            return dest
        except Exception as e:
            why = f'download failed: {type(e).__name__}: {e}'
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    die(f'Inception weights {WEIGHTS_NAME} not found in {" or ".join(dirs)} ({why}); fetch {WEIGHTS_URL} by hand '
        f'and pass --inception PATH, or put it in $DSD_DATA or {hub_dir} (or use --features pixel)')

def load_inception(path=None, device='cpu'):
    """The FID Inception with the TF 2015-12-05 weights (see find_weights), in eval mode, frozen."""
    path = find_weights(path)
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        die(f'--inception {path}: not a readable torch state dict ({type(e).__name__}: {e})')
    net = InceptionV3()
    # Files written by old torch versions lack BN's num_batches_tracked (unused in eval): allow only that gap.
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith('num_batches_tracked')]
    if missing or unexpected:
        die(f'--inception {path}: not the FID Inception state dict (missing {missing[:3]}, '
            f'unexpected {unexpected[:3]}); expected {WEIGHTS_NAME}')
    return net.eval().requires_grad_(False).to(device)

# ----------------------------------------------------------------------------------------------
# Features and statistics.

def features(images, batch=64, device='cpu', net=None, kind='inception'):
    """Features of uint8 NHWC images (one array, or an iterator of arrays): (N, 2048) float32 Inception pool3 features
    (`net` defaults to load_inception()), or for kind='pixel' the flattened pixels in [-1, 1], (N, H*W*C) float64."""
    if kind not in LABEL:
        raise ValueError(f'unknown feature kind {kind!r}; use one of {list(LABEL)}')
    if kind == 'inception' and net is None:
        net = load_inception(device=device)
    out = []
    for chunk in [images] if isinstance(images, np.ndarray) else images:
        if not (isinstance(chunk, np.ndarray) and chunk.dtype == np.uint8 and chunk.ndim == 4
                and chunk.shape[3] in (1, 3)):
            raise ValueError(f'features() wants uint8 NHWC images with 1 or 3 channels, got '
                             f'{getattr(chunk, "dtype", type(chunk))} {getattr(chunk, "shape", "")}')
        for i in range(0, len(chunk), batch):
            x = chunk[i:i + batch]
            if kind == 'pixel':
                out.append(x.reshape(len(x), -1) / 127.5 - 1)
                continue
            x = torch.from_numpy(x).to(device).permute(0, 3, 1, 2)
            with torch.inference_mode():      # grey -> RGB, as PIL's convert('RGB') would
                out.append(net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2048 if kind == 'inception' else 0), np.float32)

def sample_features(x, kind='inception', device='cpu', net=None):
    """Images NCHW in [-1, 1] go through the uint8 path above. Points (N, D) become 256 random Fourier features
    (fixed frequencies, length scale 0.25), which see the cloud's shape, not only its first two moments."""
    x = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    if x.ndim == 2:
        proj = x.astype(np.float64) @ np.random.default_rng(0).normal(0, 1 / 0.25, (x.shape[1], 128))
        return np.concatenate([np.cos(proj), np.sin(proj)], 1)
    return features(to_uint8(x), device=device, net=net, kind=kind)

def stats_of(feats):
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    feats = np.asarray(feats)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f'a covariance needs (N, D) features with at least 2 rows, got shape {feats.shape}')
    n, d = feats.shape
    if n < d:
        warnings.warn(f'only {n} samples for {d}-d features: the covariance is singular and the Frechet distance '
                      f'is biased upwards (use >= {d}; 50000 for reportable FID)', stacklevel=2)
    return feats.mean(0, dtype=np.float64), np.cov(feats, rowvar=False).astype(np.float64)

def frechet_distance(mu1, s1, mu2, s2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(s1 + s2 - 2 sqrtm(s1 s2)) between two Gaussians."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f'feature sizes differ: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}')
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        # A (near) singular product, e.g. fewer samples than dimensions: regularise both covariances.
        print(f'warning: sqrtm of a singular covariance product; adding {eps:g} * I to both', file=sys.stderr)
        offset = eps * np.eye(len(s1))
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        # The product of two PSD matrices has a real non-negative spectrum; round-off adds small imaginary parts.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f'sqrtm has a large imaginary part ({np.abs(covmean.imag).max():g}): '
                             f'the covariances are not valid (not PSD or not finite)')
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))

def save_stats(path, mu, sigma, features='inception', num=None):
    """Write .npz with mu (D,), sigma (D, D) float64 (the layout of EDM's and pytorch-fid's reference files)
    plus `features` (which kind) and `num` (sample count). Written to a temp file, then renamed."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    extra = {} if num is None else {'num': np.int64(num)}
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'wb') as f:  # a file object, so numpy does not append '.npz' to the name
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                 features=np.str_(features), **extra)
    os.replace(tmp, path)

def load_stats(path, features='inception'):
    """(mu, sigma) from a stats .npz (ours, EDM's or pytorch-fid's; files without a `features` key hold
    Inception stats). With `features` set, refuses a file of another kind."""
    if not os.path.isfile(path):
        die(f'--ref {path}: no such file; make one with `python fid.py ref --data ... --out {path}`')
    try:
        with np.load(path, allow_pickle=False) as f:
            if 'mu' not in f or 'sigma' not in f:
                die(f'--ref {path}: no mu/sigma arrays (has {list(f.keys())}); not a stats file')
            mu, sigma = f['mu'].astype(np.float64), f['sigma'].astype(np.float64)
            kind = str(f['features']) if 'features' in f else 'inception'
    except Exception as e:      # (die's SystemExit is no Exception: it passes)
        die(f'--ref {path}: not a readable .npz ({type(e).__name__}: {e})')
    if mu.ndim != 1 or sigma.shape != mu.shape * 2 or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        die(f'--ref {path}: mu {mu.shape} and sigma {sigma.shape} do not fit together, or hold NaN / inf')
    if features is not None and kind != features:
        die(f'--ref {path}: holds {kind} stats but {features} features were asked for; '
            f'{LABEL.get(kind, kind)} and {LABEL[features]} numbers cannot be compared')
    return mu, sigma

def stats_kind(path):
    """Which features a stats file holds ('inception' for files without the key)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return str(f['features']) if 'features' in f else 'inception'
    except Exception:
        return None  # load_stats reports what is wrong with the file

# ----------------------------------------------------------------------------------------------
# Samples saved as .npz, and the gathering of features computed by several processes (torchrun).

def load_samples_npz(path):
    try:
        with np.load(path, allow_pickle=False) as f:
            if 'samples' not in f:
                die(f'--images {path}: no array named samples (has {list(f.keys())})')
            x = f['samples']
    except Exception as e:
        die(f'--images {path}: not a readable .npz ({type(e).__name__}: {e})')
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] not in (1, 3):
        die(f'--images {path}: samples must be uint8 NHWC with 1 or 3 channels, got {x.dtype} {x.shape}')
    return x

def gather_rows(x, world, device):
    """Concatenate every rank's (n_r, D) array on all ranks (shards may differ in length by one)."""
    if world == 1:
        return x
    comm_dev = device if device.type == 'cuda' else torch.device('cpu')  # nccl only moves GPU tensors
    t = torch.from_numpy(np.ascontiguousarray(x)).to(comm_dev)
    n = torch.tensor([len(x)], device=comm_dev)
    counts = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(counts, n)
    most = int(max(c.item() for c in counts))
    padded = torch.zeros((most,) + tuple(t.shape[1:]), dtype=t.dtype, device=comm_dev)
    padded[:len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return np.concatenate([p[:int(c.item())].cpu().numpy() for p, c in zip(parts, counts)])

# ----------------------------------------------------------------------------------------------
# Metrics of generated samples: the one generate -> (corrupt) -> features path, Proximal FID, distances of points.

def generated_features(net, ckpt, seeds, kind, device, inception=None, corrupt=0.0, mode=None, steps=None, batch=256):
    """Features of the samples for `seeds` (one step for generators, Heun in `mode` for teachers). With `corrupt`,
    each sample is first corrupted like the data, y = x + corrupt * eps, with noise no training item uses."""
    parts = []
    for part, x in generate(net, ckpt, seeds, batch, device, mode, steps):
        if corrupt:
            x = make_noisy(x.numpy(), corrupt, index=part, stream=PROXIMAL_STREAM)
        parts.append(sample_features(x, kind, device, inception))
    return np.concatenate(parts)

def teachers_noisy_set(teacher_ckpt, data, data_dir=None):
    """The teacher's own fixed noisy training set, in model units, rebuilt from what its checkpoint records (sigma_n,
    seed and units, or the data as given), and noisy_dataset's info (its fingerprint too)."""
    cfg = teacher_ckpt.get('config', {})
    return noisy_dataset(data, teacher_ckpt['sigma_n'] * cfg.get('data_scale', 1.0), cfg.get('seed', 0), data_dir,
                         cfg.get('already_noisy', False))

def noisy_reference(teacher_ckpt, data, data_dir, kind, device, inception=None):
    """Statistics of the teacher's own noisy training set: Proximal FID's reference, whatever sigma_n the generator
    assumes."""
    y, info = teachers_noisy_set(teacher_ckpt, data, data_dir)
    recorded = teacher_ckpt.get('config', {}).get('noisy_sha256', info['sha256'])     # teachers before it: none
    if y.shape[1:] != sample_shape(teacher_ckpt['net']) or recorded != info['sha256']:
        die(f'--data {data}: not the noisy set the teacher trained on (its --data: {teacher_ckpt.get("data")}); '
            f'Proximal FID must compare with that one')
    return stats_of(sample_features(y, kind, device, inception))

def proximal(net, ckpt, noisy_stats, num, kind='inception', device='cpu', inception=None, first=0):
    """Proximal FID (Sec. 4.4): corrupt `num` generated samples (seeds first, first + 1, ...) with the generator's
    sigma_n as the data was corrupted, then the Frechet distance to the statistics of the noisy training set."""
    feats = generated_features(net, ckpt, list(range(first, first + num)), kind, device, inception, corrupt=ckpt['sigma_n'])
    return frechet_distance(*stats_of(feats), *noisy_stats)

def curve_distance(points, curve):
    """Mean distance from each point to a densely sampled clean support (the toy set's curve)."""
    return float(scipy.spatial.cKDTree(np.asarray(curve, np.float64)).query(np.asarray(points, np.float64))[0].mean())

def w2_matching(a, b):
    """Wasserstein-2 distance between two equal-size point sets by exact optimal matching (~1000 points)."""
    n = min(len(a), len(b))
    a, b = np.asarray(a[:n], np.float64), np.asarray(b[:n], np.float64)
    cost = ((a[:, None] - b[None]) ** 2).sum(-1)
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))

def figure(teacher, t_ckpt, gen, g_ckpt, out, num, batch, device, steps=None):
    """Noisy data, Ambient-Full, Ambient-Truncated and DSD side by side (the paper's Fig. 4 for points, Fig. 2 for
    images) and, where the data set can supply fresh clean samples, each one's distance to them."""
    points, seeds, data = t_ckpt['net'].get('arch') == 'mlp', list(range(num)), t_ckpt.get('data', 'toy')
    noisy = teachers_noisy_set(t_ckpt, data)[0]
    noisy = torch.from_numpy(noisy[np.random.default_rng(0).choice(len(noisy), min(num, len(noisy)), replace=False)])
    cat = lambda it: torch.cat([x for _, x in it])
    panels = {'noisy data': noisy,
              'Ambient-Full': cat(generate(teacher, t_ckpt, seeds, batch, device, 'full', steps)),
              'Ambient-Truncated': cat(generate(teacher, t_ckpt, seeds, batch, device, 'truncated', steps)),
              'DSD (one step)': cat(generate(gen, g_ckpt, seeds, batch, device))}
    table, clean = {}, builtin_clean(data, num) if data in BUILTIN else None
    if clean is not None and points:
        table = {k: dict(curve_dist=curve_distance(x.numpy(), toy_curve()), w2=w2_matching(x.numpy(), clean))
                 for k, x in panels.items()}
    elif clean is not None:
        ref = stats_of(sample_features(clean, 'pixel'))
        table = {k: dict(pixel_fd=frechet_distance(*stats_of(sample_features(x, 'pixel')), *ref)) for k, x in panels.items()}
    tiles = []
    for k, x in panels.items():
        tile = scatter(x.numpy(), background=toy_curve(4000) if data == 'toy' else None) if points else \
            grid_image(to_uint8(x[:64])).convert('RGB')
        tiles.append(Image.new('RGB', (tile.width, tile.height + 18), 'white'))
        tiles[-1].paste(tile, (0, 18))
        ImageDraw.Draw(tiles[-1]).text((4, 3), k, fill=(0, 0, 0))
    w, h = tiles[0].size
    canvas = Image.new('RGB', (w * len(tiles) + 6 * (len(tiles) - 1), h), 'white')
    for i, t in enumerate(tiles):
        canvas.paste(t, (i * (w + 6), 0))
    canvas.save(out)
    print0(f'wrote {out}')
    if table:
        names = dict(curve_dist='mean dist. to clean curve', w2='W2 to clean (1000-pt matching)',
                     pixel_fd='pixel FD to clean')
        keys = list(next(iter(table.values())))
        print0(f'{"sampler":20s}' + ''.join(f'{names[k]:>34s}' for k in keys))
        for name, row in table.items():
            print0(f'{name:20s}' + ''.join(f'{row[k]:34.4f}' for k in keys))
        with open(os.path.splitext(out)[0] + '.json', 'w') as f:
            json.dump(table, f, indent=2)
    return table

# ----------------------------------------------------------------------------------------------
# Command line.

def cmd_ref(args, rank, world, device, net):
    x, info = load_data(args.data, args.data_dir)
    if info.get('kind') != 'images' or x.ndim != 4:
        die(f'--data {args.data}: is {info.get("kind")} data of shape {x.shape}; FID needs images')
    if args.sigma:
        x = make_noisy(x, args.sigma, args.seed)  # the fixed noisy set the teacher trained on
    shard = np.array_split(np.arange(len(x)), world)[rank]
    chunks = (to_uint8(x[shard[i:i + 1024]]) for i in range(0, len(shard), 1024))
    feats = gather_rows(features(chunks, args.batch, device, net, args.features), world, device)
    if rank == 0:
        save_stats(args.out, *stats_of(feats), args.features, num=len(feats))
        noisy = f', sigma {args.sigma:g} noise seed {args.seed}' if args.sigma else ''
        print(f'wrote {args.features} stats of {len(feats)} images of {args.data}{noisy} to {args.out}')

def cmd_calc(args, rank, world, device, net, ref):
    label = ('proximal ' if args.proximal else '') + LABEL[args.features]
    if args.images:
        if not os.path.exists(args.images):
            die(f'--images {args.images}: no such folder, .zip or .npz file')
        if args.proximal or args.repeats != 1:
            die('--proximal and --repeats need --net (samples generated here with known seeds)')
        x = load_samples_npz(args.images) if args.images.endswith('.npz') else load_images(args.images, '--images')
        x = x[:args.num] if args.num else x
        if args.num and len(x) < args.num:
            die(f'--images {args.images}: has {len(x)} images, fewer than --num {args.num}')
        if len(x) < 2:
            die(f'--images {args.images}: has {len(x)} image(s); need at least 2 (50000 for a reportable FID)')
        mine = x[np.array_split(np.arange(len(x)), world)[rank]]
        runs = [(f'{len(x)} images of {args.images}', lambda: features(mine, args.batch, device, net, args.features))]
    else:
        gen, ckpt = load_net(args.net, device)
        label = ('proximal ' if args.proximal else '') + label_of(args.features, ckpt['net'].get('arch') == 'mlp')
        sigma_n = float(ckpt.get('sigma_n') or 0)
        if args.proximal and sigma_n <= 0:
            die(f'--net {args.net}: --proximal needs a checkpoint with sigma_n > 0 (it has {ckpt.get("sigma_n")})')
        runs = []
        for r in range(args.repeats):
            seeds = np.array_split(np.arange(r * args.num, (r + 1) * args.num), world)[rank].tolist()
            runs.append((f'seeds {r * args.num}-{(r + 1) * args.num - 1}', lambda seeds=seeds: generated_features(
                gen, ckpt, seeds, args.features, device, net, sigma_n if args.proximal else 0, args.mode, args.steps,
                args.batch)))
    values = []
    for what, feats_of in runs:
        feats = gather_rows(feats_of(), world, device)
        if rank == 0:
            if feats.shape[1] != len(ref[0]):
                die(f'--ref {args.ref}: has {len(ref[0])}-d stats but the images give {feats.shape[1]}-d '
                    f'{args.features} features (pixel stats need images of the same size)')
            values.append(frechet_distance(*stats_of(feats), *ref))
            print(f'{label} {values[-1]:.4f}  ({what} vs {args.ref})', flush=True)
    if rank == 0 and len(values) > 1:
        print(f'{label} {np.mean(values):.4f} +- {np.std(values, ddof=1):.4f}  (mean +- std over {len(values)} runs)')
    return values

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='examples:\n' + '\n'.join(l for l in __doc__.split('\n')
                                                                  if l.startswith(('    python', '    torchrun'))))
    sub = p.add_subparsers(dest='cmd', required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--features', choices=list(LABEL), default=None,
                        help='inception: FID (needs the weights file); pixel: flattened pixels in [-1,1], reported as '
                             '"pixel FD" (default: inception for ref, the --ref file\'s kind for calc)')
    common.add_argument('--inception', metavar='PTH', default=None,
                        help=f'{WEIGHTS_NAME} (default: look in $DSD_DATA, then torch hub checkpoints/, then download)')
    common.add_argument('--batch', type=int, default=64, help='images per forward pass (default 64)')
    common.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='torch device (default cuda if available)')
    common.add_argument('--dry-run', action='store_true', help='print the resolved configuration and exit')

    r = sub.add_parser('ref', parents=[common], help='stats of a data set (clean, or the fixed noisy set)')
    r.add_argument('--data', required=True, help='data set name or path, as for pretrain.py (cifar10, a folder, ...)')
    r.add_argument('--data-dir', default=None, help='where pretrain.py finds downloaded data (else $DSD_DATA, ./data)')
    r.add_argument('--sigma', type=float, default=0.0, help='stats of the data plus N(0, sigma^2) noise, drawn as '
                   'pretrain.py draws the teacher\'s noisy set (for Proximal FID)')
    r.add_argument('--seed', type=int, default=0, help='noise seed; must match the teacher\'s (default 0)')
    r.add_argument('--out', required=True, help='.npz to write (mu, sigma, features, num)')

    c = sub.add_parser('calc', parents=[common], help='FID of saved or generated samples against a stats file')
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument('--images', help='image folder (searched recursively), .zip, or .npz with uint8 NHWC "samples"')
    src.add_argument('--net', help='generator or teacher checkpoint: generate the samples here (no files written)')
    c.add_argument('--mode', choices=['full', 'truncated'], default=None,
                   help='teachers: Ambient-Full or Ambient-Truncated (default) sampling, as in sample.py')
    c.add_argument('--steps', type=int, default=None, help='teachers: Heun steps (18 at 32x32, 40 at 64x64)')
    c.add_argument('--ref', required=True, help='reference stats .npz (from `fid.py ref`, EDM or pytorch-fid)')
    c.add_argument('--num', type=int, default=None, help='number of samples: the first NUM images in sorted order '
                   '(default: all), or seeds 0..NUM-1 for --net (default 50000)')
    c.add_argument('--proximal', action='store_true', help='corrupt the samples with the checkpoint\'s sigma_n '
                   'before scoring, to compare against `ref --sigma` stats of the noisy training set')
    c.add_argument('--repeats', type=int, default=1, help='with --net: runs on seeds 0..num-1, num..2num-1, ...; '
                   'prints mean +- std')

    f = sub.add_parser('figure', help='noisy data, Ambient-Full, Ambient-Truncated and DSD side by side, with '
                                      'distances to clean data for the built-in sets (Fig. 4 points, Fig. 2 images)')
    f.add_argument('--net', required=True, help='the teacher (pretrain.py)')
    f.add_argument('--generator', required=True, help='the DSD generator (distill.py)')
    f.add_argument('--out', required=True, help='FILE.png (the table also goes to FILE.json)')
    f.add_argument('--num', type=int, default=None, help='samples per panel (default 1000 points / 2000 images)')
    f.add_argument('--steps', type=int, default=None, help='Heun steps (default 18 at 32x32, 40 at 64x64)')
    f.add_argument('--batch', type=int, default=256)
    f.add_argument('--device', default=None)
    args = p.parse_args(argv)
    check_ranges(args, {k: rule for k, rule in dict(batch='> 0', steps='> 0', repeats='> 0', sigma='>= 0').items()
                        if hasattr(args, k)})              # sigma: -1 would draw the noise of +1
    if getattr(args, 'num', None) is not None and args.num < 2:
        p.error('--num must be >= 2')
    if args.cmd == 'figure' and not writable_image(args.out):    # fail before minutes of sampling, not after
        die(f'--out {args.out}: give an image file (FILE.png) in a folder that exists')
    if args.cmd == 'calc':
        if args.net and args.num is None:
            args.num = 50000
    return args

def main(argv=None):
    args = parse_args(argv)
    if args.cmd == 'figure':
        device = init_distributed(args.device)[2]
        teacher, t_ckpt = load_net(args.net, device, kind='teacher')
        gen, g_ckpt = load_net(args.generator, device, kind='generator')
        if g_ckpt.get('teacher', t_ckpt['net']) != t_ckpt['net']:
            die(f'--generator {args.generator} was distilled from another teacher than --net {args.net}; pass a pair')
        points = t_ckpt['net'].get('arch') == 'mlp'
        if device.type == 'cpu' and points:
            torch.set_num_threads(1)        # the point MLP is too small for intra-op threads to pay off
        return figure(teacher, t_ckpt, gen, g_ckpt, args.out, args.num or (1000 if points else 2000), args.batch,
                      device, args.steps)
    if args.cmd == 'calc':
        args.features = args.features or stats_kind(args.ref) or 'inception'
        ref = load_stats(args.ref, args.features)  # fail on a bad --ref before any work
    else:
        args.features = args.features or 'inception'
    if args.dry_run:
        print(json.dumps(vars(args), indent=2))
        return
    rank, world, device = init_distributed(args.device)
    net = load_inception(args.inception, device) if args.features == 'inception' else None
    try:
        if args.cmd == 'ref':
            return cmd_ref(args, rank, world, device, net)
        return cmd_calc(args, rank, world, device, net, ref)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()

if __name__ == '__main__':
    main()
