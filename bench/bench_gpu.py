"""What one GPU does with DSD: device ceiling, Phase I and Phase II training steps, sampling, FID features, and
correctness on the device, in one run that prints one table.

    python bench/bench_gpu.py                                   # one CUDA device, cifar10 preset, < 8 min on an H100
    python bench/bench_gpu.py --only phase1,phase2              # a subset of the sections
    python bench/bench_gpu.py --device cpu --quick --out DIR    # CPU smoke mode (the test suite runs it): tiny preset

It measures, all in the same process and run:
  device      GPU name, torch / CUDA / cuDNN versions, and the measured dense-matmul ceiling (bf16, tf32, strict
              fp32) on large square matrices
  phase1      Algorithm 2's training step exactly as pretrain.main runs it (draw_batch, denoising_loss, optimize,
              update_ema) at 64 and 256 images per GPU, fp32 / bf16 / bf16 + torch.compile: img/s, peak memory, the
              network's FLOPs per image (forward + backward, FlopCounterMode) and the TFLOP/s that achieves, as a
              fraction of the measured bf16 ceiling
  phase2      Algorithm 1's iteration exactly as distill.main runs it (fake-score step, generator step, EMA):
              generator img/s, memory, FLOPs of the whole iteration, and the days to the paper's 100 Mimg on 4 GPUs
  sampling    50,000 one-step images; Ambient-Full / Ambient-Truncated Heun on 2,000 (projected to 50,000), against
              the paper's Tab. 3 (4 x A6000: 20 s one-step, 10 min diffusion sampling for 50k)
  fid         FID Inception-v3 features img/s at batch 250 (real weights if the file is found, else random)
  correctness EDMPrecond on the device vs on the CPU, bf16 vs fp32 loss, and a short end-to-end run of pretrain.py
              and distill.py (bf16, eager: compile is timed above) with --resume, read back by sample.py

Every section (and every configuration in it) runs in its own try/except: a failure is recorded as an error string
in the JSON and the run goes on. Configurations that would overrun --budget seconds are recorded as skipped. The
table goes to stdout; bench_gpu.json and bench_gpu.md go to --out (default $OUT if set, else runs/bench-gpu).
Nets have random weights: the cost of a step does not depend on what the nets have learned.
"""
import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import distill   # noqa: E402
import fid       # noqa: E402
import networks  # noqa: E402
import pretrain  # noqa: E402
import sample    # noqa: E402

SIGMA_N = 0.2
SECTIONS = ('device', 'phase1', 'phase2', 'sampling', 'fid', 'correctness')
PRECISIONS = (('fp32', None, False), ('bf16', torch.bfloat16, False), ('bf16+compile', torch.bfloat16, True))
MEM_NOTE = ('mem_gib: CUDA, torch.cuda.max_memory_allocated over the timed steps (weights, optimizer state and '
            'activations); CPU, the peak RSS of the whole process so far')
PAPER_TAB3 = dict(one_step_50k_s=20.0, diffusion_50k_s=600.0, hardware='4 x A6000')
T0 = time.time()


def log(msg):
    print(f'[{time.time() - T0:6.1f} s] {msg}', flush=True)


def sync(dev):
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)


def free(dev):
    gc.collect()
    if dev.type == 'cuda':
        torch.cuda.empty_cache()


def reset_peak(dev):
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)


def error_text(e):
    return f'{type(e).__name__}: {str(e).strip()[:300]}'


def guarded(name, fn, *args):
    """fn(*args), or {'error': ...} if it raises (SystemExit included: the stages' die() raises it)."""
    try:
        return fn(*args)
    except (Exception, SystemExit) as e:
        log(f'{name}: FAILED {error_text(e)}')
        traceback.print_exc()
        return dict(error=error_text(e))


def over_budget(a, cost_s):
    """True when a job estimated to take cost_s would end past --budget seconds from the start."""
    return time.time() - T0 + cost_s > a.budget


def reset_compiler():
    """A clean dynamo cache before each compiled configuration: EDMPrecond.forward is one code object for every net,
    and past dynamo's recompile limit it would silently run eager. Inductor's on-disk caches stay warm."""
    torch._dynamo.reset()


def compiled_graphs():
    return torch._dynamo.utils.counters['stats']['unique_graphs']


def count_flops(fn):
    """Matmul / convolution FLOPs of fn() (FlopCounterMode counts no elementwise work)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def noisy_images(n, res):
    """The fixed noisy set of n procedural images (pretrain's shapes set, drawn at res), float NCHW: random data
    whose cost is that of real data."""
    return torch.from_numpy(pretrain.make_noisy(pretrain.shapes_images(n, 0, res), SIGMA_N))


# ----------------------------------------------------------------------------------------------
# 1. The device and its ceiling.

def matmul_tflops(dev, dtype, n, reps, tf32=False):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        x, y = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        for _ in range(3):
            x @ y
        sync(dev)
        t = time.perf_counter()
        for _ in range(reps):
            x @ y
        sync(dev)
        return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def bench_device(a, dev):
    info = dict(device=str(dev), torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                cpu_count=os.cpu_count(), quick=a.quick, preset=a.preset,
                matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    if dev.type == 'cuda':
        p = torch.cuda.get_device_properties(dev)
        info.update(name=p.name, capability=f'{p.major}.{p.minor}', memory_gib=p.total_memory / 2 ** 30,
                    cudnn=torch.backends.cudnn.version())
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    n, reps = (512, 3) if a.quick else (8192, 20)
    info.update(matmul_n=n, matmul_reps=reps,
                bf16_tflops=matmul_tflops(dev, torch.bfloat16, n, reps),
                tf32_tflops=matmul_tflops(dev, torch.float32, n, reps, tf32=True),
                fp32_tflops=matmul_tflops(dev, torch.float32, n, reps, tf32=False))
    if dev.type == 'cpu':
        info['tf32_note'] = 'on the CPU there is no TF32: the tf32 figure is fp32'
    info['fp32_note'] = ('training "fp32" runs convolutions in TF32 (cuDNN default allow_tf32=True) and matmuls in '
                         'strict fp32 (matmul allow_tf32=False); nothing in the stages changes these flags')
    log(f'device {info["name"]}: bf16 {info["bf16_tflops"]:.1f}, tf32 {info["tf32_tflops"]:.1f}, '
        f'fp32 {info["fp32_tflops"]:.1f} TFLOP/s ({n}^3 matmul)')
    return info


# ----------------------------------------------------------------------------------------------
# Timing a step function: warm up (the first call compiles, when compiling), then time `steps` calls.

def time_steps(step, dev, warmup, steps):
    sync(dev)
    t = time.perf_counter()
    step(0)
    sync(dev)
    first = time.perf_counter() - t
    for i in range(1, warmup):
        step(i)
    sync(dev)
    reset_peak(dev)
    t = time.perf_counter()
    outs = [step(i) for i in range(warmup, warmup + steps)]
    sync(dev)
    return first, (time.perf_counter() - t) / steps, outs


def device_busy(step, dev, start, n=3):
    """The share of n more steps' wall time that the device spends in kernels (CUDA) or in aten ops (CPU), by
    torch.profiler. On a GPU, well under 1 means the step waits on the CPU launching kernels one by one: a larger
    batch or --compile pays. Near 1: bound by the device itself."""
    cuda = dev.type == 'cuda'
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    sync(dev)
    t = time.perf_counter()
    with torch.profiler.profile(activities=[activity]) as prof:
        for i in range(start, start + n):
            step(i)
        sync(dev)
    wall = time.perf_counter() - t
    busy_us = sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in prof.key_averages()
                  if e.device_type == kind)
    return busy_us / 1e6 / wall


def run_configs(a, dev, section, compiled, make_step, est_s, per_img_flops, ceiling):
    """Each (batch, precision) of PRECISIONS whose compile flag is `compiled`: a row in section['rows']."""
    for batch in a.batches:
        for name, dtype, comp in PRECISIONS:
            if comp != compiled:
                continue
            row = dict(batch=batch, precision=name)
            section['rows'].append(row)
            if comp and a.no_compile:
                row['skipped'] = a.no_compile
                continue
            if over_budget(a, est_s(batch, comp)):
                row['skipped'] = f'time budget ({a.budget:.0f} s)'
                log(f'{section["name"]} batch {batch} {name}: skipped (budget)')
                continue
            try:
                if comp:
                    reset_compiler()
                graphs0 = compiled_graphs()
                steps = max(2, a.steps // 2) if batch > a.batches[0] and name == 'fp32' else a.steps
                step, warmup = make_step(batch, dtype, comp), 3 if comp else 2
                first, dt, outs = time_steps(step, dev, warmup, steps)
                row.update(device='GPU' if dev.type == 'cuda' else 'CPU', steps=steps, step_ms=dt * 1e3,
                           img_s=batch / dt, first_step_s=first, mem_gib=pretrain.memory_gb(dev),
                           loss=float(np.mean([o for o in outs])))
                if comp:
                    row.update(compile_s=max(first - dt, 0.0), graphs=compiled_graphs() - graphs0)
                    if row['graphs'] == 0:
                        row['error'] = 'torch.compile captured no graph: this configuration ran eager'
                if per_img_flops:
                    row['tflops'] = per_img_flops * row['img_s'] / 1e12
                    row['frac_bf16_ceiling'] = row['tflops'] / ceiling if ceiling else None
                try:
                    row['busy'] = device_busy(step, dev, warmup + steps)
                except Exception as e:
                    row['busy_error'] = error_text(e)
                if not math.isfinite(row['loss']):
                    row['error'] = f'non-finite loss {row["loss"]}'
                log(f'{section["name"]} batch {batch} {name}: {row["img_s"]:.1f} img/s, {row["step_ms"]:.1f} ms/step, '
                    f'{row["mem_gib"]:.2f} GiB' + (f', compile {row["compile_s"]:.1f} s' if comp else ''))
            except (Exception, SystemExit) as e:
                row['error'] = error_text(e)
                log(f'{section["name"]} batch {batch} {name}: FAILED {row["error"]}')
            free(dev)


# ----------------------------------------------------------------------------------------------
# 2. Phase I: pretrain.main's loop body.

def phase1_setup(a, dev, batch, compiled):
    net_cfg = networks.PRESETS[a.preset]['net']
    cfg = dict(networks.PRESETS[a.preset]['train'], batch=batch, seed=0, xflip=False, sigma_n=SIGMA_N, loss='ambient')
    torch.manual_seed(0)
    net = pretrain.on_device(networks.build_net(net_cfg), dev)                  # channels-last on GPUs, as main
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg['lr'], betas=(0.9, 0.999), eps=1e-8)
    fwd = torch.compile(net) if compiled else net
    return net_cfg, cfg, net, ema, opt, fwd


def phase1_step_fn(a, dev, data):
    def make(batch, dtype, compiled):
        net_cfg, cfg, net, ema, opt, fwd = phase1_setup(a, dev, batch, compiled)
        loss_fn = lambda y, s, e, lab: pretrain.denoising_loss(fwd, y, s, e, cfg['sigma_n'], cfg['loss'], lab)

        def step(i):
            g = pretrain.step_generator(cfg['seed'], i)
            tensors = pretrain.draw_batch(data, i, cfg, net_cfg['augment_dim'], g)               # Alg. 2, line 2
            out = pretrain.optimize(opt, net, net, loss_fn, tensors, (cfg['seed'], i, 0), 0, 1, batch, dev, dtype)
            pretrain.update_ema(ema, net, pretrain.ema_beta(batch, (i + 1) * batch, cfg['ema'], cfg['ema_rampup']))
            return out[0] / max(out[1], 1)
        return step
    return make


def phase1_flops(a, dev, data, n=4):
    """FLOPs per image of one training forward + backward, and of one forward (sampling's unit)."""
    net_cfg, cfg, net, _, _, _ = phase1_setup(a, dev, n, False)
    y, sigma, eps, labels = pretrain.draw_batch(data, 0, dict(cfg, batch=n), net_cfg['augment_dim'],
                                                pretrain.step_generator(0, 0))
    y, sigma, eps, labels = (t.to(dev) for t in (y, sigma, eps, labels))
    train = count_flops(lambda: pretrain.denoising_loss(net, y, sigma, eps, SIGMA_N, 'ambient', labels).mean().backward())
    with torch.no_grad():
        forward = count_flops(lambda: net(y, sigma, labels))
    return train / n, forward / n, sum(p.numel() for p in net.parameters())


def data_ms(a, data, batch, steps=5):
    """CPU time per step of draw_batch alone (indexing, augmentation, noise): the loop pays it every step."""
    cfg = dict(networks.PRESETS[a.preset]['train'], batch=batch, seed=0, xflip=False, sigma_n=SIGMA_N, loss='ambient')
    aug = networks.PRESETS[a.preset]['net']['augment_dim']
    t = time.perf_counter()
    for i in range(steps):
        pretrain.draw_batch(data, i, cfg, aug, pretrain.step_generator(0, i))
    return (time.perf_counter() - t) / steps * 1e3


def bench_phase1(a, dev, ctx, compiled):
    sec = ctx.setdefault('phase1', dict(name='phase1', preset=a.preset, mem_note=MEM_NOTE, rows=[]))
    if 'error' in sec:
        return sec
    if not compiled:
        ctx['data'] = noisy_images(a.num_data, networks.PRESETS[a.preset]['net']['img_resolution'])
        sec['flops_per_img'], sec['fwd_flops_per_img'], n_params = phase1_flops(a, dev, ctx['data'])
        sec.update(params_m=n_params / 1e6, data_ms={str(b): data_ms(a, ctx['data'], b) for b in a.batches},
                   flops_note='matmul/conv FLOPs of denoising_loss forward + backward (FlopCounterMode), per image')
        log(f'phase1: {sec["params_m"]:.2f}M params, {sec["flops_per_img"] / 1e9:.2f} GFLOP/img fwd+bwd')
    est = lambda b, comp: 150 if comp else 10             # H200 host: the first compiled step took 124 s
    ceiling = ctx.get('device', {}).get('bf16_tflops')
    run_configs(a, dev, sec, compiled, phase1_step_fn(a, dev, ctx['data']), est, sec['flops_per_img'], ceiling)
    for row in sec['rows']:
        if 'img_s' in row:      # the paper's 200 Mimg CIFAR-10 teacher, 4 such GPUs, linear scaling
            row['days_200mimg_4gpu'] = 200e6 / (4 * row['img_s']) / 86400
    return sec


# ----------------------------------------------------------------------------------------------
# 3. Phase II: distill.main's loop body (fake-score step, generator step, EMA of G).

def phase2_setup(a, dev, batch, compiled):
    """The three nets, optimizers and settings as distill.main builds them from a teacher of this preset (random
    weights), channels-last on GPUs as distill.main places them (pretrain.on_device)."""
    net_cfg = networks.PRESETS[a.preset]['net']
    recipe = distill.RECIPES.get(a.preset, distill.RECIPES['cifar10'])
    dropout = recipe['dropout'] if recipe['dropout'] is not None else net_cfg['dropout']
    augment = recipe['augment'] if recipe['augment'] is not None else networks.PRESETS[a.preset]['train']['augment']
    c = dict(sigma_init=2.5, sigma_n=SIGMA_N, loss='ambient', method='sid', alpha=recipe['alpha'], lsg=100.0,
             tmax=800, sigma_min=0.002, augment=augment if net_cfg['augment_dim'] else 0, seed=0, batch=batch,
             ema=recipe['ema'], ema_rampup=0.05, fake_sigma=recipe['fake_sigma'])
    torch.manual_seed(0)
    weights = networks.build_net(net_cfg).state_dict()
    teacher, G, fake = (networks.build_net(dict(net_cfg, dropout=d)) for d in (0.0, dropout, dropout))
    for net in (teacher, G, fake):
        net.load_state_dict(weights)
    teacher, G, fake = (pretrain.on_device(m, dev) for m in (teacher, G, fake))
    teacher.eval().requires_grad_(False)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr=recipe['glr'], betas=(recipe['gbeta1'], 0.999), eps=1e-8)
    opt_f = torch.optim.Adam(fake.parameters(), lr=recipe['lr'], betas=(0.0, 0.999), eps=1e-8)
    run = torch.compile if compiled else (lambda m: m)
    return c, teacher, G, fake, G_ema, opt_g, opt_f, (run(G), run(fake), run(teacher))


def phase2_step_fn(a, dev):
    shape = sample.sample_shape(networks.PRESETS[a.preset]['net'])

    def make(batch, dtype, compiled):
        c, teacher, G, fake, G_ema, opt_g, opt_f, (G_fwd, fake_fwd, teacher_fwd) = phase2_setup(a, dev, batch, compiled)

        def step(i):
            g = pretrain.step_generator(c['seed'], i)
            sigma = pretrain.sample_sigma(batch, c['sigma_n'], c['loss'], g,                 # Alg. 1, lines 4-9
                                          c['fake_sigma'] == 'above')
            eps_n, eps, z = (torch.randn((batch, *shape), generator=g) for _ in range(3))
            choices, labels = pretrain.augment_choices(batch, c['augment'], shape[-1], g) if c['augment'] else (None, None)
            G.eval()
            fake.train().requires_grad_(True)
            out_f = pretrain.optimize(opt_f, fake, fake, lambda *b: distill.fake_score_step(G_fwd, fake_fwd, *b, c),
                                      (z, eps_n, sigma, eps, choices, labels), (c['seed'], i, 1), 0, 1, batch, dev, dtype)
            sigma = distill.sid_sigmas(batch, g, c['tmax'], c['sigma_min'])                  # Alg. 1, lines 10-12
            z, eps_n, eps = (torch.randn((batch, *shape), generator=g) for _ in range(3))
            G.train()
            fake.eval().requires_grad_(False)
            out_g = pretrain.optimize(opt_g, G, G, lambda *b: distill.generator_step(G_fwd, teacher_fwd, fake_fwd, *b, c),
                                      (z, eps_n, sigma, eps), (c['seed'], i, 2), 0, 1, batch, dev, dtype)
            pretrain.update_ema(G_ema, G, pretrain.ema_beta(batch, (i + 1) * batch, c['ema'], c['ema_rampup']))
            return out_f[0] / max(out_f[1], 1) + out_g[0] / max(out_g[1], 1) / c['lsg']
        return step
    return make


def bench_phase2(a, dev, ctx, compiled):
    sec = ctx.setdefault('phase2', dict(name='phase2', preset=a.preset, mem_note=MEM_NOTE, rows=[]))
    if 'error' in sec:
        return sec
    if not compiled:
        n = 4 if not a.quick else 2
        step = phase2_step_fn(a, dev)(n, None, False)
        sec['flops_per_img'] = count_flops(lambda: step(0)) / n
        sec['params_m'] = sum(p.numel() for p in networks.build_net(networks.PRESETS[a.preset]['net']).parameters()) / 1e6
        sec['params_note'] = 'per net; Phase II trains two (G, fake net) and runs three (the teacher frozen)'
        sec['flops_note'] = ('matmul/conv FLOPs of one whole iteration (G forward, fake-net forward + backward, '
                             'G forward + backward through teacher and fake net), per generator image')
        sec['img_note'] = 'img/s = generator images per second = batch / iteration time (the unit of --kimg)'
        log(f'phase2: {sec["flops_per_img"] / 1e9:.2f} GFLOP per generator image (whole iteration)')
        free(dev)
    est = lambda b, comp: 420 if comp else 25             # three graphs, each about Phase I's one
    ceiling = ctx.get('device', {}).get('bf16_tflops')
    run_configs(a, dev, sec, compiled, phase2_step_fn(a, dev), est, sec['flops_per_img'], ceiling)
    for row in sec['rows']:
        if 'img_s' in row:      # the paper's 100 Mimg of CIFAR-10 distillation, 4 such GPUs, linear scaling
            row['hours_100mimg_4gpu'] = 100e6 / (4 * row['img_s']) / 3600
    return sec


# ----------------------------------------------------------------------------------------------
# 4. Sampling (sample.generate: one step for a generator, Heun for a teacher).

def time_generate(net, ckpt, n, batch, dev, mode=None, dtype=None):
    sync(dev)
    t, count, finite = time.perf_counter(), 0, True
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
        for part, x in sample.generate(net, ckpt, list(range(n)), batch, dev, mode):
            count, finite = count + len(part), finite and bool(torch.isfinite(x).all())
    sync(dev)
    assert count == n
    return time.perf_counter() - t, finite


def bench_sampling(a, dev, ctx):
    torch.manual_seed(0)
    net = networks.build_net(networks.PRESETS[a.preset]['net']).to(dev).eval().requires_grad_(False)
    gen = dict(kind='generator', net=net.config, sigma_init=2.5, sigma_n=SIGMA_N)
    tck = dict(kind='teacher', net=net.config, sigma_n=SIGMA_N)
    n1, nh, batch = (200, 20, 100) if a.quick else (50000, 2000, 1000)
    time_generate(net, gen, batch, batch, dev)                                   # warm-up (cuDNN, allocator)
    out = dict(preset=a.preset, batch=batch, one_step_n=n1, heun_n=nh, heun_steps=sample.default_steps(tck),
               paper_tab3=PAPER_TAB3, precision_note='fp32 as sample.py runs (one-step also under bf16 autocast)')
    out['one_step_s'], ok1 = time_generate(net, gen, n1, batch, dev)
    log(f'sampling: {n1} one-step images in {out["one_step_s"]:.2f} s')
    time_generate(net, gen, batch, batch, dev, dtype=torch.bfloat16)
    out['one_step_bf16_s'], ok2 = time_generate(net, gen, n1, batch, dev, dtype=torch.bfloat16)
    out['full_s'], ok3 = time_generate(net, tck, nh, batch, dev, 'full')
    out['truncated_s'], ok4 = time_generate(net, tck, nh, batch, dev, 'truncated')
    scale = 50000 / nh
    out.update(one_step_img_s=n1 / out['one_step_s'], one_step_50k_s=out['one_step_s'] * 50000 / n1,
               full_50k_s=out['full_s'] * scale, truncated_50k_s=out['truncated_s'] * scale,
               all_finite=ok1 and ok2 and ok3 and ok4)
    if ctx.get('phase1', {}).get('fwd_flops_per_img'):
        out['one_step_tflops'] = ctx['phase1']['fwd_flops_per_img'] * out['one_step_img_s'] / 1e12
    log(f'sampling: Heun full {nh} in {out["full_s"]:.1f} s, truncated {out["truncated_s"]:.1f} s '
        f'(50k: {out["full_50k_s"]:.0f} / {out["truncated_50k_s"]:.0f} s)')
    return out


# ----------------------------------------------------------------------------------------------
# 5. FID Inception features.

def bench_fid(a, dev, ctx):
    try:
        path = fid.find_weights(download=False)
        net, weights = fid.load_inception(path, dev), f'real ({path})'
    except SystemExit:
        torch.manual_seed(0)
        net, weights = fid.InceptionV3().eval().requires_grad_(False).to(dev), f'random ({fid.WEIGHTS_NAME} not found)'
    n, batch = (4, 2) if a.quick else (5000, 250)
    res = networks.PRESETS[a.preset]['net']['img_resolution']
    images = np.random.default_rng(0).integers(0, 256, (n, res, res, 3), dtype=np.uint8)
    fid.features(images[:batch], batch, dev, net)                               # warm-up
    sync(dev)
    t = time.perf_counter()
    feats = fid.features(images, batch, dev, net)
    dt = time.perf_counter() - t
    out = dict(weights=weights, n=n, batch=batch, image_size=res, seconds=dt, img_s=n / dt,
               feature_shape=list(feats.shape), finite=bool(np.isfinite(feats).all()))
    log(f'fid: {out["img_s"]:.1f} img/s at batch {batch}, {weights} weights')
    return out


# ----------------------------------------------------------------------------------------------
# 6. Correctness on the device.

def scrambled(net, seed=0):
    """Random weights under which every layer shapes the output. EDM's init leaves the last conv of each residual
    branch and the output conv at gain 1e-5, so F ~ 0 and D ~ c_skip x: comparing outputs would test nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim > 1 and p.abs().max() < 1e-3:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith('bias'):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return net


@contextlib.contextmanager
def strict_fp32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel_max(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def check_numerics(a, dev, ctx):
    """EDMPrecond fp32 on the device vs the CPU (same weights, eval), and the bf16 vs fp32 loss on one batch."""
    net_cfg = networks.PRESETS[a.preset]['net']
    torch.manual_seed(0)
    cpu_net = scrambled(networks.build_net(net_cfg)).eval()
    n, res = 8, net_cfg['img_resolution']
    g = torch.Generator().manual_seed(1)
    sigma = torch.logspace(math.log10(0.002), math.log10(80), n)
    x = torch.randn(n, 3, res, res, generator=g) * (sigma.reshape(-1, 1, 1, 1) ** 2 + 0.25).sqrt()
    labels = torch.randn(n, net_cfg['augment_dim'], generator=g) * 0.5 if net_cfg['augment_dim'] else None
    with torch.no_grad():
        ref = cpu_net(x, sigma, labels)
        dev_net = copy.deepcopy(cpu_net).to(dev)
        fmt = torch.channels_last if dev.type == 'cuda' else torch.contiguous_format
        dev_net = dev_net.to(memory_format=fmt)
        xd = x.to(dev).contiguous(memory_format=fmt)
        lab = labels.to(dev) if labels is not None else None
        out_default = dev_net(xd, sigma.to(dev), lab).cpu()
        with strict_fp32():
            out_strict = dev_net(xd, sigma.to(dev), lab).cpu()
    c_skip = 0.25 / (sigma.reshape(-1, 1, 1, 1) ** 2 + 0.25)
    res_ = dict(precond_rel_err=rel_max(out_strict, ref), precond_rel_err_default_flags=rel_max(out_default, ref),
                precond_net_share=rel_max(ref, c_skip * x))   # max |c_out F| / max |c_skip x|: the net does matter
    # bf16 vs fp32 loss: one Phase I batch, the same weights, dropout off.
    cfg = dict(networks.PRESETS[a.preset]['train'], batch=16, seed=0, xflip=False, sigma_n=SIGMA_N, loss='ambient')
    data = ctx.get('data')
    data = data if data is not None else noisy_images(64, res)
    y, s, eps, lab = (t.to(dev) for t in pretrain.draw_batch(data, 0, cfg, net_cfg['augment_dim'],
                                                             pretrain.step_generator(0, 0)))
    with torch.no_grad():
        l32 = pretrain.denoising_loss(dev_net, y, s, eps, SIGMA_N, 'ambient', lab).float().mean()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            l16 = pretrain.denoising_loss(dev_net, y, s, eps, SIGMA_N, 'ambient', lab).float().mean()
    res_.update(loss_fp32=l32.item(), loss_bf16=l16.item(), bf16_loss_rel=abs(l16.item() - l32.item()) / abs(l32.item()))
    res_['ok'] = dict(precond=res_['precond_rel_err'] < 1e-3 and res_['precond_rel_err_default_flags'] < 3e-2,
                      bf16_loss=res_['bf16_loss_rel'] < 5e-2)
    log(f'correctness: EDMPrecond {dev} vs cpu {res_["precond_rel_err"]:.2e} (strict fp32), '
        f'{res_["precond_rel_err_default_flags"]:.2e} (default flags); bf16 loss {res_["bf16_loss_rel"]:.2e}')
    return res_


def read_stats(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_run(outdir, kind, steps, batch, before):
    """The run in outdir ended at `steps` with finite losses, logged each step after the first `before` records."""
    ck = networks.load_checkpoint(os.path.join(outdir, 'latest.pt'))
    recs = read_stats(os.path.join(outdir, 'stats.jsonl'))
    new = recs[before:]
    keys = ['loss'] if kind == 'teacher' else ['loss_fake', 'loss_gen']
    losses = [r[k] for r in new for k in keys]
    kimg = [r['kimg'] for r in new]
    want = [round((before + i + 1) * batch / 1000, 3) for i in range(len(new))]
    return dict(step=ck['state']['step'], records=len(new), first_kimg=kimg[0] if kimg else None,
                last_losses={k: new[-1][k] for k in keys} if new else {},
                ok=bool(ck['kind'] == kind and ck['state']['step'] == steps and len(new) == steps - before
                        and kimg == want and losses and all(math.isfinite(v) for v in losses)))


def check_end_to_end(a, dev, ctx):
    """pretrain.main and distill.main for a few steps (bf16), read back by sample.py, then --resume of each for a few
    more steps: the step count continues where the checkpoint left it. In a temporary folder: cifar10 checkpoints
    are about 1 GB each."""
    with tempfile.TemporaryDirectory(prefix='bench_gpu_e2e_') as root:
        return end_to_end_in(a, dev, root)


def end_to_end_in(a, dev, root):
    res = networks.PRESETS[a.preset]['net']['img_resolution']
    data = os.path.join(root, 'images.npy')
    np.save(data, sample.to_uint8(pretrain.shapes_images(a.num_data, 0, res)))
    B, n1, n2 = a.e2e_batch, a.e2e_steps, a.e2e_steps + a.e2e_more
    kimg = lambda n: f'{n * B / 1000:g}'
    common = ['--data', data, '--batch', str(B), '--tick', kimg(1), '--precision', 'bf16', '--device', str(dev)]
    pre_dir, dis_dir = os.path.join(root, 'pretrain'), os.path.join(root, 'distill')
    out = dict(batch=B, steps=n1, resume_to=n2, precision='bf16', preset=a.preset)
    timed = {}

    def run(name, main, args):
        t = time.perf_counter()
        main(args)
        timed[name] = time.perf_counter() - t
        log(f'e2e {name}: {timed[name]:.1f} s')

    pre = ['--preset', a.preset, '--sigma', str(SIGMA_N), '--outdir', pre_dir, *common]
    run('pretrain', pretrain.main, pre + ['--kimg', kimg(n1), '--snap', kimg(n1)])
    out['pretrain'] = check_run(pre_dir, 'teacher', n1, B, 0)
    teacher = os.path.join(pre_dir, 'latest.pt')
    dis = ['--teacher', teacher, '--fid-num', '0', '--outdir', dis_dir, *common]
    run('distill', distill.main, dis + ['--kimg', kimg(n1), '--snap', kimg(n1)])
    out['distill'] = check_run(dis_dir, 'generator', n1, B, 0)
    # sample.py reads both checkpoints
    gen_path = os.path.join(dis_dir, 'latest.pt')
    net, ck = sample.load_net(gen_path, dev)
    x = torch.cat([x for _, x in sample.generate(net, ck, list(range(16)), 8, dev)])
    npz = os.path.join(root, 'gen.npz')
    sample.main(['--net', gen_path, '--seeds', '0-15', '--out', npz, '--device', str(dev)])
    with np.load(npz) as f:
        u8 = f['samples']
    sample.main(['--net', teacher, '--seeds', '0-3', '--out', os.path.join(root, 'teacher.npz'), '--device', str(dev)])
    out['sample'] = dict(generator_finite=bool(torch.isfinite(x).all()), generator_shape=list(x.shape),
                         npz_shape=list(u8.shape), npz_dtype=str(u8.dtype),
                         ok=bool(torch.isfinite(x).all()) and u8.shape == (16, res, res, 3) and u8.dtype == np.uint8
                         and os.path.isfile(os.path.join(root, 'teacher.npz')))
    # --resume continues at the checkpoint's step; distill first: a teacher trained on is another teacher
    run('distill --resume', distill.main, dis + ['--kimg', kimg(n2), '--snap', kimg(n2), '--resume'])
    out['distill_resume'] = check_run(dis_dir, 'generator', n2, B, n1)
    run('pretrain --resume', pretrain.main, pre + ['--kimg', kimg(n2), '--snap', kimg(n2), '--resume'])
    out['pretrain_resume'] = check_run(pre_dir, 'teacher', n2, B, n1)
    out['seconds'] = timed
    out['ok'] = all(out[k]['ok'] for k in ('pretrain', 'distill', 'sample', 'pretrain_resume', 'distill_resume'))
    return out


def bench_correctness(a, dev, ctx, part):
    sec = ctx.setdefault('correctness', {})
    if part == 'numerics':
        sec['numerics'] = guarded('correctness numerics', check_numerics, a, dev, ctx)
    elif over_budget(a, 60):
        sec['end_to_end'] = dict(skipped=f'time budget ({a.budget:.0f} s)')
    else:
        sec['end_to_end'] = guarded('correctness end-to-end', check_end_to_end, a, dev, ctx)
    checks = {}
    if 'numerics' in sec:
        checks.update(sec['numerics'].get('ok', {'numerics': False}))
    if 'end_to_end' in sec and 'skipped' not in sec['end_to_end']:
        checks['end_to_end'] = bool(sec['end_to_end'].get('ok'))
    sec['checks'], sec['all_ok'] = checks, bool(checks) and all(checks.values())
    free(dev)
    return sec


# ----------------------------------------------------------------------------------------------
# The table.

def num(v, fmt='.1f'):
    return '-' if v is None else format(v, fmt)


def rows_of_phase(sec, title, extra):
    out = [(title, 'preset', f'{sec.get("preset")}, {num(sec.get("params_m"), ".2f")}M params, '
                              f'{num((sec.get("flops_per_img") or 0) / 1e9, ".2f")} GFLOP/img ({sec.get("flops_note", "")})')]
    for r in sec.get('rows', []):
        what = f'batch {r["batch"]} {r["precision"]}'
        if 'img_s' in r:
            text = (f'{r["img_s"]:.1f} img/s, {r["step_ms"]:.1f} ms/step, {r["mem_gib"]:.2f} GiB, '
                    f'{num(r.get("tflops"), ".1f")} TFLOP/s ({num(100 * (r.get("frac_bf16_ceiling") or 0), ".1f")}% of bf16)'
                    + (f', compile {r["compile_s"]:.0f} s' if 'compile_s' in r else '')
                    + (f', {r["device"]} busy {100 * r["busy"]:.0f}%' if 'busy' in r else '') + extra(r))
            text += f'; ERROR {r["error"]}' if 'error' in r else ''
        else:
            text = f'ERROR {r["error"]}' if 'error' in r else f'skipped: {r.get("skipped")}'
        out.append((title, what, text))
    return out


def device_rows(d):
    return [('device', d.get('name', '?'), f'torch {d.get("torch")}, CUDA {d.get("cuda")}, cuDNN {d.get("cudnn", "-")}, '
                                           f'{d.get("device")}'),
            ('device', f'matmul {d.get("matmul_n")}^3', f'bf16 {num(d.get("bf16_tflops"))}, tf32 '
                                                         f'{num(d.get("tf32_tflops"))}, fp32 {num(d.get("fp32_tflops"))} TFLOP/s')]


def sampling_rows(s):
    p = s['paper_tab3']
    return [('sampling', f'one step, {s["one_step_n"]}', f'{s["one_step_s"]:.2f} s fp32 ({s["one_step_img_s"]:.0f} img/s), '
             f'{s["one_step_bf16_s"]:.2f} s bf16; 50k: {s["one_step_50k_s"]:.1f} s (paper: {p["one_step_50k_s"]:.0f} s '
             f'on {p["hardware"]})'),
            ('sampling', f'Heun {s["heun_steps"]} steps, {s["heun_n"]}', f'Ambient-Full {s["full_s"]:.1f} s, '
             f'Ambient-Truncated {s["truncated_s"]:.1f} s; 50k: {s["full_50k_s"]:.0f} / {s["truncated_50k_s"]:.0f} s '
             f'(paper: {p["diffusion_50k_s"]:.0f} s on {p["hardware"]})')]


def fid_rows(q):
    return [('FID features', f'batch {q["batch"]}', f'{q["img_s"]:.1f} img/s ({q["n"]} images {q["image_size"]}px), '
                                                    f'{q["weights"]} weights')]


def correctness_rows(c):
    rows, n, e = [], c.get('numerics'), c.get('end_to_end')
    if n:
        rows.append(('correctness', 'numerics', f'ERROR {n["error"]}' if 'error' in n else
                     f'EDMPrecond vs CPU: {n["precond_rel_err"]:.1e} strict fp32, {n["precond_rel_err_default_flags"]:.1e} '
                     f'default flags; bf16 vs fp32 loss {n["bf16_loss_rel"]:.1e}; ok: {n["ok"]}'))
    if e:
        if 'error' in e or 'skipped' in e:
            text = f'ERROR {e["error"]}' if 'error' in e else f'skipped: {e["skipped"]}'
        else:
            text = (f'{e["steps"]} steps of {e["batch"]} bf16: pretrain '
                    f'{e["pretrain"]["ok"]}, distill {e["distill"]["ok"]}, sample.py {e["sample"]["ok"]}, resume to '
                    f'{e["resume_to"]}: {e["pretrain_resume"]["ok"]} / {e["distill_resume"]["ok"]}; '
                    + ', '.join(f'{k} {v:.0f} s' for k, v in e['seconds'].items()))
        rows.append(('correctness', 'end to end', text))
    rows.append(('correctness', 'all checks', f'{"PASS" if c.get("all_ok") else "FAIL"} {c.get("checks")}'))
    return rows


def table_rows(res):
    """(section, what, result) rows in the issue's order; a failed or skipped section is one row saying so."""
    makers = dict(device=device_rows, sampling=sampling_rows, fid=fid_rows, correctness=correctness_rows,
                  phase1=lambda sec: rows_of_phase(sec, 'Phase I', lambda r: f', 200 Mimg on 4 GPUs: '
                                                                             f'{r["days_200mimg_4gpu"]:.1f} d'),
                  phase2=lambda sec: rows_of_phase(sec, 'Phase II', lambda r: f', 100 Mimg on 4 GPUs: '
                                                                              f'{r["hours_100mimg_4gpu"] / 24:.1f} d'))
    rows = []
    for key in SECTIONS:
        sec = res.get(key) or {}
        if 'error' in sec or 'skipped' in sec:
            rows.append((key, 'error' if 'error' in sec else 'skipped', sec.get('error') or sec.get('skipped')))
            continue
        try:
            rows += makers[key](sec)
        except Exception as e:          # a table row must never cost the run its results (they are in the JSON)
            rows.append((key, 'table', f'cannot render: {error_text(e)}'))
    rows.append(('run', 'wall time', f'{res["wall_s"]:.1f} s'))
    return rows


def render(rows):
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    text = '\n'.join(f'{a:<{w0}}  {b:<{w1}}  {c}' for a, b, c in rows)
    md = '| section | what | result |\n|---|---|---|\n' + '\n'.join(
        f'| {a} | {b} | {c.replace("|", "/")} |' for a, b, c in rows)
    return text, md


# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--quick', action='store_true', help='smoke mode: tiny preset, a few iterations of each')
    p.add_argument('--out', default=os.environ.get('OUT') or os.path.join('runs', 'bench-gpu'),
                   help='where bench_gpu.json and bench_gpu.md go (default $OUT, else runs/bench-gpu)')
    p.add_argument('--preset', default=None, help='network preset (default cifar10; tiny with --quick)')
    p.add_argument('--steps', type=int, default=None, help='timed steps per configuration (default 20; 2 quick)')
    p.add_argument('--budget', type=float, default=450, help='seconds: configurations that would end later are skipped')
    p.add_argument('--only', default=None, help=f'comma-separated sections to run, of {",".join(SECTIONS)}')
    p.add_argument('--no-compile', action='store_true', help='skip every torch.compile configuration')
    a = p.parse_args(argv)
    a.preset = a.preset or ('tiny' if a.quick else 'cifar10')
    if a.preset not in networks.PRESETS or networks.PRESETS[a.preset]['net']['arch'] != 'songunet':
        networks.die(f'--preset {a.preset}: choose an image preset ({", ".join(k for k in networks.PRESETS if k != "toy")})')
    a.only = set(SECTIONS if a.only is None else a.only.split(','))
    if a.only - set(SECTIONS):
        networks.die(f'--only {",".join(sorted(a.only - set(SECTIONS)))}: unknown; choose from {",".join(SECTIONS)}')
    a.steps = a.steps or (2 if a.quick else 20)
    a.batches = (4, 8) if a.quick else (64, 256)
    a.num_data = 64 if a.quick else 512
    a.e2e_batch, a.e2e_steps, a.e2e_more = (8, 3, 2) if a.quick else (64, 30, 5)
    # torch.compile on the CPU needs inductor's C++ build: ~90 s for the tiny net on 2 cores, too slow for a smoke test
    a.no_compile = ('--no-compile' if a.no_compile else
                    'skipped on CPU (inductor C++ compile takes minutes)' if a.device.startswith('cpu') else False)
    return a


def main(argv=None):
    a = parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            networks.die('--device cuda: no CUDA device here; use --device cpu --quick for the smoke test')
        dev = torch.device('cuda', dev.index or 0)
        torch.cuda.set_device(dev)
    os.makedirs(a.out, exist_ok=True)
    threads = torch.get_num_threads()
    if a.quick and dev.type == 'cpu':
        torch.set_num_threads(1)    # tiny nets: intra-op threads do not pay off, and on a shared box they cost 15x
    try:
        return run(a, dev)
    finally:
        torch.set_num_threads(threads)


def save(a, res):
    """The results so far, without the working data, rows in table order, written to bench_gpu.json (atomically: a
    run killed mid-write keeps the last whole file)."""
    out = dict(args=res['args'], **{k: res[k] for k in SECTIONS if k in res}, wall_s=time.time() - T0)
    order = [p[0] for p in PRECISIONS]
    for sec in ('phase1', 'phase2'):
        if isinstance(out.get(sec), dict) and 'rows' in out[sec]:
            out[sec] = {k: v for k, v in out[sec].items() if k != 'name'}
            out[sec]['rows'] = sorted(out[sec]['rows'], key=lambda r: (r['batch'], order.index(r['precision'])))
    path = os.path.join(a.out, 'bench_gpu.json')
    with open(path + '.tmp', 'w') as fh:
        json.dump(out, fh, indent=1, default=str)
    os.replace(path + '.tmp', path)
    return out


def run(a, dev):
    log(f'bench_gpu on {dev}, preset {a.preset}, batches {a.batches}, {a.steps} timed steps, budget {a.budget:.0f} s, '
        f'out {a.out}')
    res = dict(args=dict(device=str(dev), quick=a.quick, preset=a.preset, steps=a.steps, budget=a.budget,
                         batches=list(a.batches), only=sorted(a.only)))
    ctx = res   # sections read each other's results (the ceiling, the FLOPs, the data)
    # The most informative work first: a run cut short by the budget loses the compile configurations last.
    jobs = [('device', lambda: guarded('device', bench_device, a, dev)),
            ('correctness', lambda: bench_correctness(a, dev, ctx, 'numerics')),
            ('phase1', lambda: guarded('phase1', bench_phase1, a, dev, ctx, False)),
            ('phase2', lambda: guarded('phase2', bench_phase2, a, dev, ctx, False)),
            ('sampling', lambda: guarded('sampling', bench_sampling, a, dev, ctx)),
            ('fid', lambda: guarded('fid', bench_fid, a, dev, ctx)),
            ('correctness', lambda: bench_correctness(a, dev, ctx, 'end_to_end')),
            ('phase1', lambda: guarded('phase1', bench_phase1, a, dev, ctx, True)),
            ('phase2', lambda: guarded('phase2', bench_phase2, a, dev, ctx, True))]
    for name, job in jobs:
        if name not in a.only:
            res.setdefault(name, dict(skipped='not in --only'))
            continue
        res[name] = job()
        free(dev)
        save(a, res)                    # after every job: a run killed from outside keeps what it measured
    results = save(a, res)
    text, md = render(table_rows(results))
    print('\n' + text, flush=True)
    with open(os.path.join(a.out, 'bench_gpu.md'), 'w') as fh:
        fh.write(f'# bench_gpu ({res["device"].get("name", dev)}, {time.strftime("%Y-%m-%d %H:%M")})\n\n{md}\n')
    log(f'wrote {os.path.join(a.out, "bench_gpu.json")} and bench_gpu.md')
    return results


if __name__ == '__main__':
    main()
