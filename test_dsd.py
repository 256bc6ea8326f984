"""The test suite: CPU only, tiny configs, fixed seeds, no network.  Run: python -m pytest -q test_dsd.py"""
import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
import pytest
import torch

import distill
import networks
import pretrain
import sample

ROOT = os.path.dirname(os.path.abspath(__file__))


def _run(args, cwd, env=None, timeout=600):
    """Run a script of this repo as a user would; return the CompletedProcess."""
    e = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def _torchrun(args, cwd, nproc=2, timeout=600):
    e = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', *args]
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def _script(name):
    return os.path.join(ROOT, name)


def _one_line_error(proc, pattern):
    """Bad input ends in exactly one 'error: ...' line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert 'Traceback' not in proc.stderr, proc.stderr
    assert len(err) >= 1 and err[-1].startswith('error: '), proc.stderr
    assert re.search(pattern, err[-1]), err[-1]


def _state_close(a, b, tol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=tol, rtol=tol), k


# ------------------------------------------------------------------------------------------------
# Data and corruption (pretrain.py)

def test_noisy_set_is_fixed_float_and_unclipped():
    x, info = pretrain.load_data('shapes')
    assert info['kind'] == 'images' and x.shape[1:] == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    y1 = pretrain.make_noisy(x[:50], 0.2, seed=3)
    y2 = pretrain.make_noisy(x[:50], 0.2, seed=3)
    assert y1.dtype == np.float32 and np.array_equal(y1, y2)                      # same in every run
    assert np.array_equal(pretrain.make_noisy(x[:50][[7, 3]], 0.2, 3, index=[7, 3]), y1[[7, 3]])  # per item
    assert not np.array_equal(pretrain.make_noisy(x[:50], 0.2, seed=4), y1)
    assert y1.min() < -1 and y1.max() > 1                                         # never clipped
    assert abs(float((y1 - x[:50]).std()) - 0.2) < 0.01
    y, _ = pretrain.noisy_dataset('toy', 0.2, seed=0)
    clean, _ = pretrain.load_data('toy')
    assert y.shape == clean.shape and not np.allclose(y, clean)
    assert np.array_equal(pretrain.noisy_dataset('toy', 0.2, 0, already_noisy=True)[0], clean)


def test_builtin_clean_samples_differ_from_training_set():
    a = pretrain.builtin_clean('toy', 100)
    b, _ = pretrain.load_data('toy')
    assert a.shape == (100, 2) and not np.allclose(a, b[:100])
    curve = pretrain.toy_curve()
    from scipy.spatial import cKDTree
    assert cKDTree(curve).query(a)[0].max() < 0.01                                # on the clean curve


def test_data_formats_and_bad_data(tmp_path):
    from PIL import Image
    g = np.random.default_rng(0)
    folder = tmp_path / 'imgs'
    (folder / 'sub').mkdir(parents=True)
    imgs = g.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / ('sub' if i % 2 else '') / f'{i:03d}.png')
    x, info = pretrain.load_data(str(folder))
    assert x.shape == (5, 3, 8, 8) and info['kind'] == 'images'
    with zipfile.ZipFile(tmp_path / 'imgs.zip', 'w') as z:
        for i, im in enumerate(imgs):
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format='PNG')
            z.writestr(f'{i:05d}.png', buf.getvalue())
    xz, _ = pretrain.load_data(str(tmp_path / 'imgs.zip'))
    np.save(tmp_path / 'imgs.npy', imgs)
    xn, _ = pretrain.load_data(str(tmp_path / 'imgs.npy'))
    assert np.allclose(xz, xn) and np.allclose(x[:3], xn[[0, 2, 4]])   # sorted by path: top level first
    assert np.allclose(xn, imgs.transpose(0, 3, 1, 2) / 127.5 - 1, atol=1e-6)
    np.savez(tmp_path / 'pts.npz', pts=g.normal(size=(10, 3)))
    assert pretrain.load_data(str(tmp_path / 'pts.npz'))[1]['kind'] == 'points'

    Image.fromarray(g.integers(0, 256, (8, 6, 3), dtype=np.uint8)).save(folder / 'zz.png')
    with pytest.raises(SystemExit, match='must be square'):
        pretrain.load_data(str(folder))
    os.remove(folder / 'zz.png')
    Image.fromarray(g.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / 'zz.png')
    with pytest.raises(SystemExit, match='same size'):
        pretrain.load_data(str(folder))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(SystemExit, match='no PNG/JPEG'):
        pretrain.load_data(str(tmp_path / 'empty'))
    with pytest.raises(SystemExit, match='no such file'):
        pretrain.load_data(str(tmp_path / 'missing'))
    (tmp_path / 'bad.npy').write_bytes(b'not numpy')
    with pytest.raises(SystemExit, match='cannot read'):
        pretrain.load_data(str(tmp_path / 'bad.npy'))
    (tmp_path / 'bad.zip').write_bytes(b'not a zip')
    with pytest.raises(SystemExit, match='not a readable zip'):
        pretrain.load_data(str(tmp_path / 'bad.zip'))


def _fake_cifar(path, evil=False):
    """A cifar-10-python.tar.gz in the real layout, 4 images per batch (or a batch that tries to run code)."""
    with tarfile.open(path, 'w:gz') as tar:
        for k in range(1, 6):
            data = np.full((4, 3072), k, np.uint8)
            blob = pickle.dumps({'data': data, 'labels': [0] * 4}, protocol=2)
            if evil and k == 3:
                blob = b"cos\nsystem\n(S'touch " + str(path).encode() + b".pwned'\ntR."
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{k}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_cifar10_loader_reads_the_tarball_and_runs_no_code(tmp_path):
    _fake_cifar(tmp_path / 'cifar-10-python.tar.gz')
    x, info = pretrain.load_data('cifar10', str(tmp_path))
    assert x.shape == (20, 3, 32, 32) and np.allclose(x[4:8], 2 / 127.5 - 1)
    evil = tmp_path / 'evil'
    evil.mkdir()
    _fake_cifar(evil / 'cifar-10-python.tar.gz', evil=True)
    with pytest.raises(SystemExit, match='not a readable'):
        pretrain.load_data('cifar10', str(evil))
    assert not os.path.exists(str(evil / 'cifar-10-python.tar.gz') + '.pwned')


def test_augment_permutes_pixels_and_labels_match_edm_layout():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(64, 3, 8, 8)
    out, labels = pretrain.augment(y, 1.0, g)
    assert out.shape == y.shape and labels.shape == (64, 9)
    assert (labels[:, [2, 5, 6]] == 0).all()                    # scale and anisotropy are never applied
    for i in range(64):
        if (labels[i, 7:9] == 0).all():                          # flips and quarter turns permute the pixels
            assert torch.equal(out[i].flatten().sort()[0], y[i].flatten().sort()[0])
    flipped = labels[:, 0] == 1
    assert 0.3 < flipped.float().mean() < 0.7
    out0, lab0 = pretrain.augment(y, 0.0, g)                     # p = 0: only EDM's x-flip remains
    assert (lab0[:, 1:] == 0).all()
    assert all(torch.equal(out0[i], y[i].flip(2) if lab0[i, 0] else y[i]) for i in range(64))


# ------------------------------------------------------------------------------------------------
# Eq. (3) vs Eq. (1): what the denoiser learns

def test_ambient_loss_learns_clean_posterior_mean(tmp_path):
    """Gaussian data x0 ~ N(0, s0^2 I): E[x0|x_t] = s0^2/(s0^2+sigma^2) x_t, E[y|x_t] = (s0^2+sn^2)/(s0^2+sn^2+sigma^2) x_t.
    A briefly trained toy denoiser must approach the first under Eq. (3) and the second under Eq. (1)."""
    s0, sn = 0.5, 0.5
    g = np.random.default_rng(0)
    np.save(tmp_path / 'gauss.npy', (g.normal(size=(20000, 2)) * s0).astype(np.float32))
    errs = {}
    for loss in ('ambient', 'standard'):
        out = tmp_path / loss
        pretrain.main(['--data', str(tmp_path / 'gauss.npy'), '--sigma', str(sn), '--loss', loss, '--preset', 'toy',
                       '--kimg', '400', '--batch', '512', '--lr', '2e-3', '--warmup', '20', '--ema', '10',
                       '--outdir', str(out), '--device', 'cpu'])
        net, ck = sample.load_net(str(out / 'latest.pt'), 'cpu')
        for sigma in (0.6, 1.0, 2.0):
            x_t = torch.from_numpy(g.normal(size=(4000, 2)).astype(np.float32)) * float(np.sqrt(s0**2 + sigma**2))
            with torch.no_grad():
                d = net(x_t, torch.full((4000,), sigma))
            clean = s0**2 / (s0**2 + sigma**2) * x_t
            noisy = (s0**2 + sn**2) / (s0**2 + sn**2 + sigma**2) * x_t
            errs[loss, sigma] = ((d - clean).pow(2).mean().sqrt().item(), (d - noisy).pow(2).mean().sqrt().item())
    print(errs)
    for sigma in (0.6, 1.0, 2.0):
        to_clean, to_noisy = errs['ambient', sigma]
        assert to_clean < 0.35 * to_noisy, (sigma, errs)
        to_clean, to_noisy = errs['standard', sigma]
        assert to_noisy < 0.35 * to_clean, (sigma, errs)


# ------------------------------------------------------------------------------------------------
# Sampling (sample.py, Algorithm 3)

def _tiny_ckpt(path, kind='teacher', sigma_n=0.2, points=False):
    """A checkpoint with random weights, in the format the stages write."""
    torch.manual_seed(0)
    cfg = dict(networks.PRESETS['toy' if points else 'tiny']['net'])
    if not points:
        cfg.update(img_resolution=8, model_channels=16, attn_resolutions=[4])
    net = networks.build_net(cfg)
    ck = dict(format='dsd-1', kind=kind, net=net.config, ema=net.state_dict(), sigma_n=sigma_n, loss='ambient',
              data='shapes', kimg=0.0)
    if kind == 'generator':
        ck.update(sigma_init=2.5, teacher=net.config)
    networks.save_checkpoint(str(path), ck)
    return str(path)


class _Counting(torch.nn.Module):
    """Wraps a denoiser and records the noise level of every evaluation."""
    def __init__(self, net):
        super().__init__()
        self.net, self.sigmas = net, []

    def forward(self, x, sigma, augment_labels=None):
        self.sigmas.append(float(torch.as_tensor(sigma).reshape(-1)[0]))
        return self.net(x, sigma, augment_labels)


def test_seeds_give_the_same_images_at_any_batch_size(tmp_path):
    net, ck = sample.load_net(_tiny_ckpt(tmp_path / 't.pt'), 'cpu')
    seeds = list(range(10, 17))
    for mode in ('truncated', 'full'):
        a = torch.cat([x for _, x in sample.generate(net, ck, seeds, 1, 'cpu', mode, steps=4)])
        b = torch.cat([x for _, x in sample.generate(net, ck, seeds, 7, 'cpu', mode, steps=4)])
        assert torch.allclose(a, b, atol=1e-5)
    gnet, gck = sample.load_net(_tiny_ckpt(tmp_path / 'g.pt', 'generator'), 'cpu')
    a = torch.cat([x for _, x in sample.generate(gnet, gck, seeds, 1, 'cpu')])
    b = torch.cat([x for _, x in sample.generate(gnet, gck, seeds[3:], 7, 'cpu')])
    assert torch.allclose(a[3:], b, atol=1e-5)


def test_truncated_sampling_stops_at_sigma_n_and_one_step_evaluates_once(tmp_path):
    net, ck = sample.load_net(_tiny_ckpt(tmp_path / 't.pt', sigma_n=0.2), 'cpu')
    z = sample.latents([0, 1], (3, 8, 8))
    full = _Counting(net)
    sample.heun_sampler(full, z, steps=18)
    assert len(full.sigmas) == 35 and min(full.sigmas) == pytest.approx(0.002, rel=1e-4)   # EDM: 2N-1 evals
    trunc = _Counting(net)
    x = sample.heun_sampler(trunc, z, steps=18, sigma_stop=0.2)
    levels = sample.karras_sigmas(18).tolist()
    k = next(i for i in range(18) if levels[i + 1] < 0.2)        # first step whose next level is below sigma_n
    assert trunc.sigmas[-1] == pytest.approx(levels[k], rel=1e-6) and min(trunc.sigmas) >= 0.2
    # the result is the denoised estimate D(x; sigma_k) at the last level reached
    assert len(trunc.sigmas) == 2 * k + 1
    gnet, gck = sample.load_net(_tiny_ckpt(tmp_path / 'g.pt', 'generator'), 'cpu')
    one = _Counting(gnet)
    out = sample.one_step(one, z, gck['sigma_init'])
    assert one.sigmas == [2.5] and out.shape == z.shape
    assert torch.allclose(out, gnet(z * 2.5, torch.full((2,), 2.5)))


def test_parse_seeds():
    assert sample.parse_seeds('0-3,7') == [0, 1, 2, 3, 7]
    for bad in ('5-2', 'a-b', '-3', '1,,2'):
        with pytest.raises(SystemExit, match='--seeds'):
            sample.parse_seeds(bad)


def test_sample_cli_writes_pngs_npz_and_refuses_bad_input(tmp_path):
    gen = _tiny_ckpt(tmp_path / 'g.pt', 'generator')
    r = _run([_script('sample.py'), '--net', gen, '--seeds', '998-1001', '--out', str(tmp_path / 'png'),
              '--grid', str(tmp_path / 'grid.png')], tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / 'png')) == ['000000', '001000']
    assert os.path.isfile(tmp_path / 'png' / '001000' / '001001.png') and os.path.isfile(tmp_path / 'grid.png')
    r = _run([_script('sample.py'), '--net', gen, '--seeds', '0-4', '--out', str(tmp_path / 's.npz')], tmp_path)
    arr = np.load(tmp_path / 's.npz')['samples']
    assert arr.dtype == np.uint8 and arr.shape == (5, 8, 8, 3)
    toy = _tiny_ckpt(tmp_path / 'p.pt', 'generator', points=True)
    _run([_script('sample.py'), '--net', toy, '--seeds', '0-9', '--out', str(tmp_path / 'p.npz')], tmp_path)
    pts = np.load(tmp_path / 'p.npz')['samples']
    assert pts.dtype == np.float32 and pts.shape == (10, 2)
    _one_line_error(_run([_script('sample.py'), '--net', gen, '--seeds', '9-2'], tmp_path), '--seeds')
    _one_line_error(_run([_script('sample.py'), '--net', str(tmp_path / 'nope.pt')], tmp_path), 'nope.pt')
    (tmp_path / 'junk.pt').write_bytes(b'junk')
    _one_line_error(_run([_script('sample.py'), '--net', str(tmp_path / 'junk.pt')], tmp_path), 'junk.pt')
    other = torch.load(gen, weights_only=True)
    other['kind'] = 'optimizer'
    torch.save(other, tmp_path / 'other.pt')
    _one_line_error(_run([_script('sample.py'), '--net', str(tmp_path / 'other.pt')], tmp_path),
                    'neither a teacher nor a generator')


# ------------------------------------------------------------------------------------------------
# pretrain.py: multi-process equivalence, resume after SIGKILL, bad input

_TOY = ['--data', 'toy', '--sigma', '0.2', '--batch', '64', '--lr', '2e-3', '--warmup', '0.2', '--ema', '0.5',
        '--tick', '0.5', '--device', 'cpu']


def test_pretrain_torchrun_two_processes_match_one(tmp_path):
    a = _run([_script('pretrain.py'), *_TOY, '--kimg', '1.5', '--snap', '1.5', '--outdir', str(tmp_path / 'one')],
             tmp_path)
    assert a.returncode == 0, a.stderr
    b = _torchrun([_script('pretrain.py'), *_TOY, '--kimg', '1.5', '--snap', '1.5', '--outdir', str(tmp_path / 'two')],
                  tmp_path)
    assert b.returncode == 0, b.stderr
    ca, cb = (torch.load(tmp_path / d / 'latest.pt', weights_only=True) for d in ('one', 'two'))
    assert ca['config']['noisy_sha256'] == cb['config']['noisy_sha256']          # the same noisy set on all ranks
    _state_close(ca['ema'], cb['ema'], 1e-5)
    _state_close(ca['state']['net'], cb['state']['net'], 1e-5)
    assert not torch.equal(ca['ema']['model.out.weight'], _init_toy_state()['model.out.weight'])  # it trained


def _init_toy_state():
    torch.manual_seed(0)
    return networks.build_net(networks.PRESETS['toy']['net']).state_dict()


def _kill_after_snapshot(cmd, cwd, snapshot_path, timeout=300):
    """Start a run, SIGKILL it as soon as a snapshot exists (mid-training), return."""
    e = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, *cmd], cwd=cwd, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while not os.path.exists(snapshot_path) and proc.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.05)
    assert proc.poll() is None, 'the run finished before it could be killed: ' + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return torch.load(snapshot_path, weights_only=True)        # what was on disk is a whole checkpoint


def test_pretrain_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = [_script('pretrain.py'), *_TOY, '--kimg', '3', '--snap', '0.5']
    ref = _run([*args, '--outdir', str(tmp_path / 'ref')], tmp_path)
    assert ref.returncode == 0, ref.stderr
    part = _kill_after_snapshot([*args, '--outdir', str(tmp_path / 'run')], tmp_path, tmp_path / 'run' / 'latest.pt')
    assert part['state']['step'] < 47
    res = _run([*args, '--outdir', str(tmp_path / 'run'), '--resume'], tmp_path)
    assert res.returncode == 0 and 'resuming' in res.stdout, res.stderr
    a, b = (torch.load(tmp_path / d / 'latest.pt', weights_only=True) for d in ('ref', 'run'))
    assert a['state']['step'] == b['state']['step'] == 47
    _state_close(a['ema'], b['ema'], 1e-6)
    _state_close(a['state']['net'], b['state']['net'], 1e-6)


def test_pretrain_bad_input_ends_in_one_clear_line(tmp_path):
    run = lambda *a: pretrain.main([*_TOY, '--kimg', '0.1', '--outdir', str(tmp_path / 'o'), *a])
    for args, msg in [(['--data', str(tmp_path / 'missing')], 'no such file'),
                      (['--sigma', '-0.1'], 'must be >= 0'),
                      (['--sigma', 'abc'], 'not a number'),
                      (['--batch', '60', '--batch-gpu', '8'], 'not divisible'),
                      (['--preset', 'huge'], 'unknown'),
                      (['--preset', 'tiny'], 'is for images'),
                      (['--resume'], 'does not exist')]:
        with pytest.raises(SystemExit, match=msg):
            run(*args)
    run('--kimg', '0.128', '--snap', '0.128')                    # a finished run of the toy architecture ...
    with pytest.raises(SystemExit, match='another architecture'):
        pretrain.main([*_TOY, '--kimg', '0.2', '--outdir', str(tmp_path / 'o'), '--resume', '--dropout', '0.1'])
    _one_line_error(_run([_script('pretrain.py'), '--data', 'toy', '--sigma', '-1'], tmp_path), '--sigma')


# ------------------------------------------------------------------------------------------------
# distill.py (Algorithm 1)

@pytest.fixture(scope='module')
def toy_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp('teacher')
    pretrain.main([*_TOY, '--kimg', '3', '--snap', '3', '--outdir', str(out)])
    return str(out / 'latest.pt')


_DIST = ['--data', 'toy', '--batch', '32', '--tick', '0.128', '--fid-num', '200', '--device', 'cpu']


def test_distill_torchrun_two_processes_match_one(tmp_path, toy_teacher):
    args = [_script('distill.py'), *_DIST, '--teacher', toy_teacher, '--kimg', '0.32', '--snap', '0.32']
    a = _run([*args, '--outdir', str(tmp_path / 'one')], tmp_path)
    assert a.returncode == 0, a.stderr
    b = _torchrun([*args, '--outdir', str(tmp_path / 'two')], tmp_path)
    assert b.returncode == 0, b.stderr
    ca, cb = (torch.load(tmp_path / d / 'latest.pt', weights_only=True) for d in ('one', 'two'))
    _state_close(ca['ema'], cb['ema'], 1e-5)
    _state_close(ca['state']['fake'], cb['state']['fake'], 1e-5)
    t = torch.load(toy_teacher, weights_only=True)
    assert not torch.allclose(ca['state']['G']['model.out.weight'], t['ema']['model.out.weight'])   # G moved
    assert ca['kind'] == 'generator' and ca['sigma_init'] == 2.5 and ca['sigma_n'] == 0.2
    assert ca['teacher'] == t['net'] and ca['loss'] == 'ambient'
    assert os.path.isfile(tmp_path / 'one' / 'best.pt') and 'proximal_fd' in ca['metrics']


def test_distill_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, toy_teacher):
    args = [_script('distill.py'), *_DIST, '--teacher', toy_teacher, '--kimg', '1.6', '--snap', '0.32']
    ref = _run([*args, '--outdir', str(tmp_path / 'ref')], tmp_path)
    assert ref.returncode == 0, ref.stderr
    part = _kill_after_snapshot([*args, '--outdir', str(tmp_path / 'run')], tmp_path, tmp_path / 'run' / 'latest.pt')
    assert part['state']['step'] < 50
    res = _run([*args, '--outdir', str(tmp_path / 'run'), '--resume'], tmp_path)
    assert res.returncode == 0 and 'resuming' in res.stdout, res.stderr
    a, b = (torch.load(tmp_path / d / 'latest.pt', weights_only=True) for d in ('ref', 'run'))
    assert a['state']['step'] == b['state']['step'] == 50
    _state_close(a['ema'], b['ema'], 1e-6)
    _state_close(a['state']['G'], b['state']['G'], 1e-6)


def test_distill_bad_input_ends_in_one_clear_line(tmp_path, toy_teacher):
    _one_line_error(_run([_script('distill.py'), '--sigma', '0.2'], tmp_path),
                    r'no teacher at .*python pretrain\.py --data cifar10 --sigma 0\.2')
    (tmp_path / 'junk.pt').write_bytes(b'\x00' * 10)
    _one_line_error(_run([_script('distill.py'), '--teacher', str(tmp_path / 'junk.pt')], tmp_path), 'junk.pt')
    gen = _tiny_ckpt(tmp_path / 'g.pt', 'generator', points=True)
    _one_line_error(_run([_script('distill.py'), '--teacher', gen], tmp_path), 'generator checkpoint')
    for args, msg in [(['--sigma', '-0.5'], 'must be >= 0'), (['--method', 'gan'], 'unknown'),
                      (['--way', 'standard'], 'force-way'), (['--batch', '30', '--batch-gpu', '4'], 'not divisible')]:
        with pytest.raises(SystemExit, match=msg):
            distill.main(['--teacher', toy_teacher, '--data', 'toy', '--fid-num', '0', '--outdir', str(tmp_path / 'o'),
                          *args])
