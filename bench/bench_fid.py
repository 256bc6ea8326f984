"""Check fid.py's Inception against pytorch-fid's, with the same random weights, and time both.

Needs a Python with torchvision (pytorch-fid's model is built on it) and pytorch-fid's source outside the repo:
    PYTORCH_FID_SRC=/path/to/pytorch-fid/src python bench/bench_fid.py            # equivalence + speed
    PYTORCH_FID_SRC=/path/to/pytorch-fid/src python bench/bench_fid.py --bench-only   # or --compare-only
    python bench/bench_fid.py --ours-only                   # speed of ours alone (no torchvision)
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import fid  # noqa: E402

REF_SRC = os.environ.get('PYTORCH_FID_SRC', 'pytorch-fid/src')   # a checkout of mseitzer/pytorch-fid, outside this repo


def random_weights(net, seed):
    """Random but well-scaled weights: He-normal convs and non-trivial BN statistics, so features neither
    vanish nor explode through ~100 layers and every parameter influences the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.8 + 0.4 * torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.8 + 0.4 * torch.rand(n, generator=g))
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(0.01 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.01 * torch.randn(m.bias.shape, generator=g))
    return net


def random_images(n, res, seed):
    """Half white noise, half smooth colour gradients with noise: not all images alike."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, res, res, 3)).astype(np.float64)
    t = np.linspace(0, 1, res)
    for i in range(n // 2):
        a, b, c = rng.uniform(0, 255, (3, 3))
        smooth = a + (b - a) * t[None, :, None] + (c - a) * t[:, None, None]
        x[i] = 0.8 * smooth + 0.2 * x[i]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max(), np.linalg.norm(a - b) / np.linalg.norm(b)


def build_theirs(state_path):
    sys.path.insert(0, REF_SRC)
    import pytorch_fid.inception as pfi
    # pytorch-fid downloads its weights inside fid_inception_v3(); hand it our file instead (strict load).
    pfi.load_state_dict_from_url = lambda *a, **k: torch.load(state_path, weights_only=True)
    return pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()


def compare(n, res, tmp):
    from PIL import Image
    sys.path.insert(0, REF_SRC)
    import pytorch_fid.fid_score as pfs

    ours = random_weights(fid.InceptionV3(), seed=1).eval()
    state_path = os.path.join(tmp, 'random_inception.pth')
    torch.save(ours.state_dict(), state_path)
    theirs = build_theirs(state_path)
    # Layout: pytorch-fid's FID Inception (torchvision's Inception3 patched) has exactly our keys and shapes.
    import pytorch_fid.inception as pfi
    full = pfi.fid_inception_v3()  # the whole patched torchvision Inception3 its blocks are cut from
    a = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    print(f'state dict: {len(a)} keys theirs, {len(b)} ours, identical names+shapes: {a == b}')
    assert a == b

    net = fid.load_inception(state_path)  # also exercises our loader on the file
    imgdir = os.path.join(tmp, 'imgs')
    os.makedirs(imgdir, exist_ok=True)
    for i, im in enumerate(random_images(n, res, seed=2)):
        Image.fromarray(im).save(os.path.join(imgdir, f'{i:05d}.png'))
    files = sorted(os.path.join(imgdir, f) for f in os.listdir(imgdir))

    t = time.time()
    act_t = pfs.get_activations(files, theirs, batch_size=50, dims=2048, device='cpu', num_workers=0)
    mu_t, s_t = act_t.mean(0), np.cov(act_t, rowvar=False)
    print(f'pytorch-fid: {n} images in {time.time() - t:.1f} s')
    t = time.time()
    act_o = fid.features(fid.read_images(fid.image_files(imgdir)), 50, 'cpu', net)
    mu_o, s_o = fid.stats_of(act_o)
    print(f'ours:        {n} images in {time.time() - t:.1f} s')

    print(f'feature scale: mean {act_t.mean():.4g}, std {act_t.std():.4g}')
    print('features  max|diff|/max|ref| %.3g   ||diff||/||ref|| %.3g' % rel(act_o, act_t))
    print('mu        max|diff|/max|ref| %.3g   ||diff||/||ref|| %.3g' % rel(mu_o, mu_t))
    print('sigma     max|diff|/max|ref| %.3g   ||diff||/||ref|| %.3g' % rel(s_o, s_t))
    def entrywise(a, b):  # max |a - b| / |b| over the entries where b is not ~0 (random weights leave dead units)
        big = np.abs(b) > 1e-3 * np.abs(b).max()
        return np.max(np.abs(a - b)[big] / np.abs(b[big]))
    print(f'entrywise max rel: mu {entrywise(mu_o, mu_t):.3g}, diag(sigma) {entrywise(np.diag(s_o), np.diag(s_t)):.3g}'
          f' ({np.sum(np.diag(s_t) == 0)} of 2048 units never fire)')
    # FD between the two implementations' stats of the same images, and one FD computed both ways.
    half = n // 2
    print(f'FD(ours stats, pytorch-fid stats) = {fid.frechet_distance(mu_o, s_o, mu_t, s_t):.3g}'
          f'   (sqrtm round-off floor: FD(pytorch-fid stats, themselves) = '
          f'{fid.frechet_distance(mu_t, s_t, mu_t, s_t):.3g}; scale: Tr(sigma) = {np.trace(s_t):.4g})')
    m1, c1 = fid.stats_of(act_o[:half])
    m2, c2 = fid.stats_of(act_o[half:])
    n1, d1 = act_t[:half].mean(0), np.cov(act_t[:half], rowvar=False)
    n2, d2 = act_t[half:].mean(0), np.cov(act_t[half:], rowvar=False)
    fo, ft = fid.frechet_distance(m1, c1, m2, c2), pfs.calculate_frechet_distance(n1, d1, n2, d2)
    print(f'FD(first half, second half): ours {fo:.6f}  pytorch-fid {ft:.6f}  rel diff {abs(fo - ft) / abs(ft):.2g}')


def bench(batch, reps, tmp, with_theirs):
    torch.manual_seed(0)
    x = random_images(batch, 32, seed=3)
    ours = random_weights(fid.InceptionV3(), seed=1).eval()
    runs = [('ours (fid.features)', lambda: fid.features(x, batch, 'cpu', ours))]
    if with_theirs:
        state_path = os.path.join(tmp, 'random_inception.pth')
        torch.save(ours.state_dict(), state_path)
        theirs = build_theirs(state_path)

        def run_theirs():
            with torch.no_grad():  # what pytorch-fid's get_activations does per batch after ToTensor:
                # ToTensor makes each image a contiguous CHW tensor, and the DataLoader stacks them (NCHW).
                t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().float().div(255)
                return theirs(t)[0].squeeze(3).squeeze(2).numpy()
        runs.append(('pytorch-fid InceptionV3', run_theirs))
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch} of 32x32 uint8, {reps} reps')
    results = {}
    for name, fn in runs:
        fn()  # warm-up
    for rep in range(reps):  # interleave, so drift in machine load hits both alike
        for name, fn in runs:
            t = time.perf_counter()
            fn()
            results.setdefault(name, []).append(batch / (time.perf_counter() - t))
    for name, v in results.items():
        print(f'{name:26s} {np.median(v):6.1f} img/s (median; runs {", ".join(f"{r:.1f}" for r in v)})')


if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('--n', type=int, default=300)
    p.add_argument('--res', type=int, default=32)
    p.add_argument('--batch', type=int, default=100)
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--bench-only', action='store_true')
    p.add_argument('--ours-only', action='store_true')
    p.add_argument('--compare-only', action='store_true')
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not (a.bench_only or a.ours_only):
            compare(a.n, a.res, tmp)
        if not a.compare_only:
            bench(a.batch, a.reps, tmp, with_theirs=not a.ours_only)
