"""Phase II of DSD: distill the noisy-data teacher into a one-step generator (Algorithm 1).

    python distill.py --data toy                            # after: python pretrain.py --data toy
    torchrun --nproc_per_node=4 distill.py --sigma 0.2      # after: torchrun ... pretrain.py --sigma 0.2

Line numbers in `# Alg. 1, line K` follow README's listing of Algorithm 1 (lines 8 and 11 are the paper's
"corrupt the generated samples" lines). Every iteration takes one fake-net step, then one generator step.
"""
import argparse
import copy
import glob
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist

import fid
import networks
from pretrain import (batch_indices, denoising_loss, die, ema_beta, init_distributed, memory_gb, noisy_dataset,
                      print0, sample_sigma, update_ema)
import sample

# Distillation recipes per teacher preset: SiD's for the paper's nets; the small nets need a larger lr and a
# smaller batch to move within CPU minutes (see README, "What to expect on a CPU").
RECIPES = {
    'cifar10': dict(lr=1e-5, glr=1e-5, batch=256, kimg=100000, ema=500, tick=50, snap=2000, fid_num=50000),
    'ffhq64': dict(lr=1e-5, glr=1e-5, batch=256, kimg=15000, ema=500, tick=50, snap=1000, fid_num=50000),
    'tiny': dict(lr=1e-4, glr=1e-4, batch=32, kimg=16, ema=500, tick=1, snap=4, fid_num=2000),
    'toy': dict(lr=1e-4, glr=1e-4, batch=256, kimg=512, ema=500, tick=32, snap=128, fid_num=2000),
}
RECIPES['afhq64'] = RECIPES['celebahq64'] = RECIPES['ffhq64']


def sid_sigmas(n, g, tmax=800, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """SiD's generator noise levels: t ~ U[0, tmax/1000] mapped through EDM's rho-schedule."""
    t = torch.rand(n, generator=g) * tmax / 1000
    return (sigma_max ** (1 / rho) + (1 - t) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def generator_loss(x, d_real, d_fake, method='sid', alpha=1.2):
    """Per-element generator loss (Appendix C). x: the (corrupted) generator samples, with grad; d_real / d_fake:
    the teacher's and the fake net's x0-predictions at x + sigma * eps. Each sample is normalised by the mean
    absolute error of the teacher, w, as SiD does."""
    w = (x - d_real).detach().abs().flatten(1).mean(1).clamp(min=1e-5).reshape(-1, *[1] * (x.ndim - 1))
    if method == 'sid':    # D-SiD, the Fisher-divergence loss (Eq. 10); grads flow through both nets' inputs
        return (d_real - d_fake) * ((d_real - x) - alpha * (d_real - d_fake)) / w
    if method == 'dmd':    # D-DMD, KL (Eq. 9): a surrogate whose gradient in x is (f_psi - f_phi) / w
        grad = (d_fake - d_real).detach() / w
    elif method == 'sds':  # D-SDS (Eq. 8): no fake net
        grad = (x - d_real).detach() / w
    else:
        raise ValueError(f'unknown method {method!r}')
    return 0.5 * (x - (x - grad).detach()) ** 2


def find_teacher(data, sigma):
    """The convention: runs/pretrain-<data>-sigma<sigma>/latest.pt (any sigma if --sigma is not given)."""
    name = os.path.splitext(os.path.basename(os.path.normpath(data)))[0]
    pattern = os.path.join('runs', f'pretrain-{name}-sigma{"*" if sigma is None else f"{sigma:g}"}', 'latest.pt')
    found = sorted(glob.glob(pattern))
    if len(found) == 1:
        return found[0]
    s = '0.2' if sigma is None else f'{sigma:g}'
    if not found:
        die(f'no teacher at {pattern}; train one with `python pretrain.py --data {data} --sigma {s}` '
            f'or pass --teacher PATH')
    die(f'several teachers match {pattern} ({", ".join(found)}); pass --sigma or --teacher')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='DSD Phase II: denoising score distillation into a one-step '
                                            'generator (Algorithm 1).')
    p.add_argument('--data', default='cifar10', help='the noisy data set of the teacher (for Proximal FID)')
    p.add_argument('--data-dir', default=None)
    p.add_argument('--sigma', type=float, default=None, help='sigma_n (default: the teacher\'s)')
    p.add_argument('--teacher', default=None, help='default runs/pretrain-<data>-sigma<sigma>/latest.pt')
    p.add_argument('--method', default='sid', help='sid (D-SiD, default) | dmd (D-DMD) | sds (D-SDS)')
    p.add_argument('--alpha', type=float, default=1.2, help='SiD\'s alpha')
    p.add_argument('--way', default=None, choices=['ambient', 'standard'],
                   help='adjusted (Eq. 3) or standard (Eq. 1) way; default: the teacher\'s loss')
    p.add_argument('--force-way', action='store_true', help='allow a --way other than the teacher\'s')
    p.add_argument('--sigma-init', type=float, default=2.5, help='G(z) = D(sigma_init * z; sigma_init)')
    p.add_argument('--tmax', type=float, default=800, help='SiD: generator noise levels t ~ U[0, tmax/1000]')
    p.add_argument('--sigma-min', type=float, default=0.002, help='smallest generator noise level')
    p.add_argument('--gen-sigma-min', action='store_true',
                   help='paper-literal variant: generator noise levels >= sigma_n (authors\' code: 0.002)')
    p.add_argument('--lr', type=float, help='fake-net Adam learning rate')
    p.add_argument('--glr', type=float, help='generator Adam learning rate')
    p.add_argument('--batch', type=int, help='total batch size')
    p.add_argument('--batch-gpu', type=int, default=None, help='per-process batch; smaller accumulates')
    p.add_argument('--lsg', type=float, default=100.0, help='generator loss scale')
    p.add_argument('--ema', type=float, help='generator EMA half-life, kimg')
    p.add_argument('--ema-rampup', type=float, default=0.05)
    p.add_argument('--kimg', type=float, help='distillation length, thousands of generator images')
    p.add_argument('--tick', type=float, help='kimg between progress lines')
    p.add_argument('--snap', type=float, help='kimg between snapshots (grid, checkpoint, Proximal FID)')
    p.add_argument('--fid-num', type=int, help='samples for Proximal FID at each snapshot (0: none)')
    p.add_argument('--features', default='auto', choices=['auto', 'inception', 'pixel'],
                   help='features for snapshot metrics; auto = pixel for points and <=16px images')
    p.add_argument('--ref', default=None, help='clean statistics (.npz) for FID at each snapshot')
    p.add_argument('--outdir', default=None, help='default runs/distill-<data>-sigma<sigma>')
    p.add_argument('--resume', nargs='?', const='latest', default=None)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'])
    p.add_argument('--device', default=None)
    p.add_argument('--dry-run', action='store_true', help='print the resolved configuration and exit')
    return p.parse_args(argv)


def resolve(args):
    if args.method not in ('sid', 'dmd', 'sds'):
        die(f'--method {args.method}: unknown; choose sid (D-SiD), dmd (D-DMD) or sds (D-SDS)')
    if args.sigma is not None and not args.sigma >= 0:
        die(f'--sigma {args.sigma}: the noise level must be >= 0')
    path = args.teacher or find_teacher(args.data, args.sigma)
    teacher = networks.load_checkpoint(path)
    if teacher.get('kind') != 'teacher':
        die(f'--teacher {path}: a {teacher.get("kind")} checkpoint; distillation needs a teacher from pretrain.py')
    sigma_n = teacher['sigma_n'] if args.sigma is None else args.sigma
    if args.sigma is not None and abs(args.sigma - teacher['sigma_n']) > 1e-9:
        print0(f'warning: --sigma {args.sigma:g} differs from the teacher\'s sigma_n {teacher["sigma_n"]:g} '
               '(a mis-specified noise level, as in the paper\'s study)')
    way = args.way or teacher['loss']
    if way != teacher['loss'] and not args.force_way:
        die(f'--way {way}: the teacher was trained with --loss {teacher["loss"]}; teacher, fake net and generator '
            f'must use the same way (add --force-way to override)')
    preset = teacher.get('config', {}).get('preset') or \
        ('toy' if teacher['net'].get('arch') == 'mlp' else 'tiny' if teacher['net']['img_resolution'] <= 16
         else 'cifar10' if teacher['net']['img_resolution'] <= 32 else 'ffhq64')
    recipe = dict(RECIPES.get(preset, RECIPES['cifar10']))
    for k in ('lr', 'glr', 'batch', 'kimg', 'ema', 'tick', 'snap', 'fid_num'):
        if getattr(args, k) is not None:
            recipe[k] = getattr(args, k)
    points = teacher['net'].get('arch') == 'mlp'
    features = args.features if args.features != 'auto' else \
        ('pixel' if points or teacher['net']['img_resolution'] <= 16 else 'inception')
    data = teacher.get('data', args.data) if args.data == 'cifar10' and args.teacher else args.data
    name = os.path.splitext(os.path.basename(os.path.normpath(data)))[0]
    cfg = dict(teacher_path=path, data=data, sigma_n=float(sigma_n), way=way, method=args.method, alpha=args.alpha,
               sigma_init=args.sigma_init, tmax=args.tmax,
               sigma_min=max(args.sigma_min, sigma_n) if args.gen_sigma_min else args.sigma_min,
               lsg=args.lsg, ema_rampup=args.ema_rampup, seed=args.seed, precision=args.precision,
               features=features, ref=args.ref, preset=preset, **recipe,
               outdir=args.outdir or os.path.join('runs', f'distill-{name}-sigma{sigma_n:g}'))
    return cfg, teacher


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    cfg, teacher_ckpt = resolve(args)
    if device.type == 'cpu' and teacher_ckpt['net'].get('arch') == 'mlp':
        torch.set_num_threads(1)        # the point MLP is too small for intra-op threads to pay off
    batch_gpu = args.batch_gpu or cfg['batch'] // world
    if cfg['batch'] % (world * batch_gpu):
        die(f'--batch {cfg["batch"]} is not divisible by world size {world} x --batch-gpu {batch_gpu}')
    accum = cfg['batch'] // (world * batch_gpu)
    if args.dry_run:
        print0(json.dumps(dict(config=cfg, teacher_net=teacher_ckpt['net'], world=world, batch_gpu=batch_gpu,
                               accum=accum), indent=2))
        return
    sigma_n, way, method = cfg['sigma_n'], cfg['way'], cfg['method']

    # Alg. 1, lines 1-2: the frozen teacher f_phi; G_theta and f_psi start as copies of its EMA weights.
    teacher = networks.build_net(teacher_ckpt['net'])
    teacher.load_state_dict(teacher_ckpt['ema'])
    teacher = teacher.to(device).eval().requires_grad_(False)
    G, fake = (copy.deepcopy(teacher).train().requires_grad_(True) for _ in range(2))
    G_ema = copy.deepcopy(teacher).eval()
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg['glr'], betas=(0.0, 0.999), eps=1e-8)
    opt_f = torch.optim.Adam(fake.parameters(), lr=cfg['lr'], betas=(0.0, 0.999), eps=1e-8)
    step, best = 0, math.inf
    latest = os.path.join(cfg['outdir'], 'latest.pt')
    if args.resume:
        path = latest if args.resume == 'latest' else args.resume
        if not os.path.isfile(path):
            die(f'--resume: {path} does not exist; run without --resume to start')
        ck = networks.load_checkpoint(path)
        if ck.get('kind') != 'generator' or 'state' not in ck:
            die(f'--resume {path}: not a distillation checkpoint with training state')
        if ck['net'] != teacher.config:
            die(f'--resume {path}: that run distilled another architecture; use its --teacher or a new --outdir')
        G.load_state_dict(ck['state']['G'])
        fake.load_state_dict(ck['state']['fake'])
        G_ema.load_state_dict(ck['ema'])
        opt_g.load_state_dict(ck['state']['opt_g'])
        opt_f.load_state_dict(ck['state']['opt_f'])
        step, best = ck['state']['step'], ck['state']['best']
        print0(f'resuming {path} at {step * cfg["batch"] / 1000:.1f} kimg')
    G_ema.requires_grad_(False)
    wrap = lambda m: torch.nn.parallel.DistributedDataParallel(
        m, device_ids=[device] if device.type == 'cuda' else None) if world > 1 else m
    G_ddp, fake_ddp = wrap(G), wrap(fake)
    dtype = torch.bfloat16 if cfg['precision'] == 'bf16' else None
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    points = teacher.config.get('arch') == 'mlp'
    shape = (teacher.config['img_channels'],) if points else \
        (teacher.config['img_channels'], teacher.config['img_resolution'], teacher.config['img_resolution'])
    s_init = cfg['sigma_init']
    total_steps = max(1, round(cfg['kimg'] * 1000 / cfg['batch']))
    tick_steps = max(1, round(cfg['tick'] * 1000 / cfg['batch']))
    snap_steps = max(1, round(cfg['snap'] * 1000 / cfg['batch']))

    # Proximal FID needs the statistics of the noisy training set; compute them once, fail early if impossible.
    if cfg['ref']:
        fid.load_stats(cfg['ref'], cfg['features'])             # a missing or mismatched file fails now, not later
    noisy_stats = inception = None
    if cfg['fid_num'] and sigma_n > 0 and rank == 0:
        y, _ = noisy_dataset(cfg['data'], sigma_n, teacher_ckpt.get('config', {}).get('seed', 0), args.data_dir,
                             teacher_ckpt.get('config', {}).get('already_noisy', False))
        if y.shape[1:] != shape:
            die(f'--data {cfg["data"]}: shape {y.shape[1:]} does not match the teacher\'s {shape}')
        inception = fid.load_inception(device=device) if cfg['features'] == 'inception' else None
        noisy_stats = fid.stats_of(fid.sample_features(y, cfg['features'], device, inception))
        del y
    if rank == 0:
        os.makedirs(cfg['outdir'], exist_ok=True)
        with open(os.path.join(cfg['outdir'], 'config.json'), 'w') as f:
            json.dump(dict(config=cfg, world=world, batch_gpu=batch_gpu), f, indent=2)
        print0(f'distilling {cfg["teacher_path"]} (sigma_n={sigma_n:g}, way={way}) with D-{method.upper()}: '
               f'{total_steps} steps of {cfg["batch"]} on {world} x {device.type}')

    t0, tick_t0, tick = time.time(), time.time(), dict(loss_f=0.0, loss_g=0.0, n=0, bad=0)
    lo = rank * batch_gpu * accum
    while step < total_steps:                                                   # Alg. 1, line 3: repeat
        g = torch.Generator().manual_seed(cfg['seed'] * 1_000_003 + step)     # (seed, step) -> exact resume
        torch.manual_seed(cfg['seed'] * 1_000_003 + step * 7919 + rank)       # dropout

        # Alg. 1, line 4: fake-net step; f_psi learns the score of the corrupted generator samples (D-SDS: none)
        if method != 'sds':
            fake.train().requires_grad_(True)
            opt_f.zero_grad(set_to_none=True)
            sig_f = sample_sigma(cfg['batch'], sigma_n, way, g)
            eps_n, eps_f = torch.randn((cfg['batch'], *shape), generator=g), torch.randn((cfg['batch'], *shape), generator=g)
            z_all = torch.randn((cfg['batch'], *shape), generator=g)
            for a in range(accum):
                sl = slice(lo + a * batch_gpu, lo + (a + 1) * batch_gpu)
                with torch.no_grad(), autocast():
                    x_g = sample.one_step(G, z_all[sl].to(device), s_init).float()    # Alg. 1, lines 5-6: z -> x_g
                y_g = x_g + sigma_n * eps_n[sl].to(device)                            # Alg. 1, lines 7-8: corrupt
                ctx = fake_ddp.no_sync() if world > 1 and a < accum - 1 else torch.enable_grad()
                with ctx, autocast():
                    # Alg. 1, line 9: the teacher's own loss (Eq. 3 or Eq. 1) with y_g in place of the data
                    per = denoising_loss(fake_ddp, y_g, sig_f[sl].to(device), eps_f[sl].to(device), sigma_n, way)
                    per = per.float()
                    ok = per.flatten(1).isfinite().all(1)                            # drop samples with NaNs
                    loss_f = per[ok].sum() / (cfg['batch'] // world)
                loss_f.backward()
                tick['loss_f'] += loss_f.item() * (cfg['batch'] // world) / per[0].numel()
            for p in fake.parameters():
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
            opt_f.step()

        # Alg. 1, line 10: generator step
        fake.eval().requires_grad_(False)
        opt_g.zero_grad(set_to_none=True)
        sig_g = sid_sigmas(cfg['batch'], g, cfg['tmax'], cfg['sigma_min'])
        z_all = torch.randn((cfg['batch'], *shape), generator=g)
        eps_n, eps_g = torch.randn((cfg['batch'], *shape), generator=g), torch.randn((cfg['batch'], *shape), generator=g)
        for a in range(accum):
            sl = slice(lo + a * batch_gpu, lo + (a + 1) * batch_gpu)
            ctx = G_ddp.no_sync() if world > 1 and a < accum - 1 else torch.enable_grad()
            with ctx, autocast():
                x_g = sample.one_step(G_ddp, z_all[sl].to(device), s_init).float()   # Alg. 1, line 10
                s = sig_g[sl].to(device).reshape(-1, *[1] * len(shape))
                # Alg. 1, line 11: the generator sees its samples through the data's corruption. Adjusted way:
                # x_g + sigma_n eps1 + sqrt(sigma^2 - sigma_n^2) eps2 ~ x_g + sigma eps; standard way: y_g + sigma eps.
                x_in = x_g if way == 'ambient' else x_g + sigma_n * eps_n[sl].to(device)
                x_sigma = x_in + s * eps_g[sl].to(device)
                with torch.set_grad_enabled(method == 'sid'):          # DMD/SDS use stop-gradient scores
                    d_real = teacher(x_sigma, s.flatten()).float()
                    d_fake = fake(x_sigma, s.flatten()).float() if method != 'sds' else d_real
                per = generator_loss(x_in, d_real, d_fake, method, cfg['alpha'])        # Eq. (2), App. C
                ok = per.flatten(1).isfinite().all(1)
                loss_g = per[ok].sum() * cfg['lsg'] / (cfg['batch'] // world)           # Alg. 1, line 12
            loss_g.backward()
            tick['loss_g'] += loss_g.item() / cfg['lsg'] * (cfg['batch'] // world) / per[0].numel()
            tick['bad'] += int((~ok).sum())
            tick['n'] += batch_gpu
        for p in G.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        opt_g.step()
        step += 1
        update_ema(G_ema, G, ema_beta(cfg['batch'], step * cfg['batch'], cfg['ema'], cfg['ema_rampup']))  # Alg. 1, line 13

        done = step == total_steps
        if step % tick_steps == 0 or done:
            stats = torch.tensor([tick['loss_f'], tick['loss_g'], tick['n'], tick['bad']], dtype=torch.float64,
                                 device=device)
            if world > 1:
                dist.all_reduce(stats)
            lf, lg, n, bad = stats.tolist()
            if n and bad >= n:
                die(f'every generator sample of the last tick had a non-finite loss (at {step} steps); lower --glr '
                    f'/ --lr or resume from the last snapshot')
            kimg, dt = step * cfg['batch'] / 1000, time.time() - tick_t0
            sec_kimg = dt / max(n / 1000, 1e-9)
            rec = dict(kimg=round(kimg, 3), loss_fake=lf / max(n, 1), loss_gen=lg / max(n, 1), nonfinite=int(bad),
                       sec_per_kimg=sec_kimg, eta_s=(total_steps - step) * cfg['batch'] / 1000 * sec_kimg,
                       mem_gb=memory_gb(device), time_s=time.time() - t0)
            print0(f'kimg {kimg:9.2f}  loss_fake {rec["loss_fake"]:.4f}  loss_gen {rec["loss_gen"]:+.4f}  '
                   f'sec/kimg {sec_kimg:7.2f}  ETA {rec["eta_s"] / 60:6.1f} min  mem {rec["mem_gb"]:.2f} GB')
            if rank == 0:
                with open(os.path.join(cfg['outdir'], 'stats.jsonl'), 'a') as f:
                    f.write(json.dumps(rec) + '\n')
            tick_t0, tick = time.time(), dict(loss_f=0.0, loss_g=0.0, n=0, bad=0)
        if step % snap_steps == 0 or done:
            best = snapshot(cfg, step, G, fake, G_ema, opt_g, opt_f, teacher_ckpt, noisy_stats, inception, best,
                            device, rank, world)
    print0(f'done: {latest}')                   # Alg. 1, line 14: the EMA generator is the one-step model
    if world > 1:
        dist.destroy_process_group()


def snapshot(cfg, step, G, fake, G_ema, opt_g, opt_f, teacher_ckpt, noisy_stats, inception, best, device, rank,
             world):
    """Rank 0: grid PNG, Proximal FID (and FID with --ref), latest.pt, and best.pt by Proximal FID (Sec. 4.4)."""
    kimg = step * cfg['batch'] / 1000
    ckpt = dict(format='dsd-1', kind='generator', net=G_ema.config, ema=G_ema.state_dict(),
                sigma_n=cfg['sigma_n'], loss=cfg['way'], sigma_init=cfg['sigma_init'], method=cfg['method'],
                teacher=teacher_ckpt['net'], data=cfg['data'], kimg=kimg, config=cfg)
    metrics = {}
    if rank == 0 and noisy_stats is not None:
        metrics['proximal_fd'] = fid.proximal(G_ema, ckpt, noisy_stats, cfg['fid_num'], cfg['features'], device,
                                              inception)
        if cfg['ref']:
            gen = (x for _, x in sample.generate(G_ema, ckpt, list(range(cfg['fid_num'])), 256, device))
            feats = np.concatenate([fid.sample_features(x, cfg['features'], device, inception) for x in gen])
            metrics['fid'] = fid.frechet_distance(*fid.stats_of(feats), *fid.load_stats(cfg['ref'], cfg['features']))
    ckpt['metrics'] = metrics
    score = metrics.get('proximal_fd', math.inf)
    if rank == 0:
        full = dict(ckpt, state=dict(G=G.state_dict(), fake=fake.state_dict(), opt_g=opt_g.state_dict(),
                                     opt_f=opt_f.state_dict(), step=step, best=min(best, score)))
        networks.save_checkpoint(os.path.join(cfg['outdir'], 'latest.pt'), full)
        if score < best or score == best == math.inf:          # without metrics, best.pt is the latest
            networks.save_checkpoint(os.path.join(cfg['outdir'], 'best.pt'), ckpt)
        sample.save_preview(G_ema, ckpt, os.path.join(cfg['outdir'], f'samples-{round(kimg * 1000):09d}img.png'),
                            device)
        label = 'Proximal FID' if cfg['features'] == 'inception' else 'proximal pixel FD'
        names = dict(proximal_fd=label, fid='FID' if cfg['features'] == 'inception' else 'pixel FD')
        print0(f'snapshot {kimg:.2f} kimg  ' + '  '.join(f'{names[k]} {v:.4f}' for k, v in metrics.items()))
        with open(os.path.join(cfg['outdir'], 'metrics.jsonl'), 'a') as f:
            f.write(json.dumps(dict(kimg=kimg, **metrics)) + '\n')
    if world > 1:
        dist.barrier()
    return min(best, score)


if __name__ == '__main__':
    main()
