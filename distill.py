"""Phase II of DSD: distill the noisy-data teacher into a one-step generator (Algorithm 1).

    python distill.py --data toy                            # after: python pretrain.py --data toy
    torchrun --nproc_per_node=4 distill.py --sigma 0.2      # after: torchrun ... pretrain.py --sigma 0.2

Line numbers in `# Alg. 1, line K` follow README's listing of Algorithm 1 (lines 8 and 11 are the paper's
"corrupt the generated samples" lines). Each iteration: --fake-steps fake-score steps (SiD: 1), one generator step.
"""
import argparse
import copy
import glob
import json
import math
import os
import time

import torch
import torch.distributed as dist

from fid import (file_sha256, frechet_distance, generated_features, label_of, load_inception, load_stats,
                 noisy_reference, proximal, stats_of)
from networks import build_net, die, end_distributed, init_distributed, load_checkpoint, print0, save_checkpoint
from pretrain import (apply_augment, augment_choices, check_ranges, denoising_loss, ema_beta, log_tick, on_device,
                      optimize, resume_checkpoint, sample_sigma, split_batch, start_run, step_generator, steps_of,
                      update_ema, write_snapshot)
from sample import one_step, sample_shape

# Distillation recipes per teacher preset. The paper's 32x32 and 64x64 runs are "identical to SiD" (App. D.2); the
# values are SiD's published launch settings (mingyuanzhou/SiD run_sid.sh, with sid_train.py's defaults where a
# launch line sets none): cifar10, run_sid.sh lines 25-45: batch 256, lr = glr 1e-5, g_beta1 0 (default), alpha 1.2,
# dropout 0.13 and augment 0.12 (defaults); ffhq64, lines 101-125: batch 512, lr = glr 1e-5, --g_beta1 0.9, alpha 1.2,
# --dropout 0.05, --augment 0.15; afhq64, lines 128-151: batch 512, --lr = --glr 5e-6, g_beta1 0, --alpha 1.0,
# --dropout 0.05, --augment 0.15. celebahq64 has no SiD recipe; the authors' RSD code gives it FFHQ's
# (TianyuCodings/RSD run_bash/distill.sh, operator/run_bash/celeba_train_sid.sh). In all, the fake net's Adam betas
# are (0, 0.999) and init_sigma is 2.5 (sid_train.py); lengths are the paper's (100 Mimg CIFAR-10, 15 Mimg 64x64).
# dropout: fake net's and G's; augment: the fake net's (None: the teacher's); fake_sigma: the fake net's Eq. (3) sigma,
# clamped to sigma_n (authors') or above it; glr_end: last glr / glr, on a cosine (SiD: 1). tiny, toy: bench/RECIPES.md
_SID = dict(lr=1e-5, glr=1e-5, gbeta1=0.0, alpha=1.2, sigma_init=2.5, ema=500, ema_rampup=0.05, tick=50, snap=1000,
            fid_num=50000, fake_sigma='clamp', fake_steps=1, glr_end=1.0, tmax=800)
RECIPES = {
    'cifar10': dict(_SID, batch=256, kimg=100000, dropout=0.13, augment=0.12, snap=2000),
    'ffhq64': dict(_SID, batch=512, kimg=15000, dropout=0.05, augment=0.15, gbeta1=0.9),
    'afhq64': dict(_SID, batch=512, kimg=15000, dropout=0.05, augment=0.15, lr=5e-6, glr=5e-6, alpha=1.0),
    'celebahq64': dict(_SID, batch=512, kimg=15000, dropout=0.05, augment=0.15, gbeta1=0.9),
    'tiny': dict(_SID, lr=3e-4, glr=5e-5, sigma_init=1.0, batch=32, kimg=64, ema_rampup=0.5, tick=1, snap=4,
                 fid_num=2000, dropout=None, augment=None, fake_sigma='above', fake_steps=2, glr_end=0.0),
    'toy': dict(_SID, lr=1e-4, glr=5e-5, alpha=1.0, sigma_init=0.5, tmax=450, batch=256, kimg=4224, ema_rampup=0.25,
                tick=32, snap=128, fid_num=10000, dropout=None, augment=None, fake_steps=2),
}


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


def fake_score_step(G, fake, z, eps_n, sigma, eps, choices, labels, c):
    """Alg. 1, lines 4-9, the fake-score step on one batch: f_psi learns the score of the generator's samples seen
    through the data's corruption, with the teacher's loss (sigma drawn as fake_sigma says) and augmentation (when
    the teacher's recipe augments: it only moves pixels, so the noise stays i.i.d.). Returns the per-element loss."""
    with torch.no_grad():
        x_g = one_step(G, z, c['sigma_init'])                                # Alg. 1, lines 5-6: x_g = G(sigma_init z)
    y_g = x_g + c['sigma_n'] * eps_n                                          # Alg. 1, lines 7-8: corrupt like the data
    y_g = apply_augment(y_g, choices) if choices is not None else y_g
    return denoising_loss(fake, y_g, sigma, eps, c['sigma_n'], c['loss'], labels)   # Alg. 1, line 9: Eq. (3) / (1)


def generator_step(G, teacher, fake, z, eps_n, sigma, eps, c):
    """Alg. 1, lines 10-12, the generator step on one batch: the divergence between the teacher's and the fake net's
    predictions at the generator's corrupted samples. Returns the per-element loss that theta minimises."""
    x_g = one_step(G, z, c['sigma_init'])                                     # Alg. 1, line 10: with grad to theta
    # Alg. 1, line 11: the generator sees its samples through the data's corruption. Ambient loss:
    # x_g + sigma_n eps1 + sqrt(sigma^2 - sigma_n^2) eps2 ~ x_g + sigma eps; standard loss: y_g + sigma eps.
    x_in = x_g if c['loss'] != 'standard' else x_g + c['sigma_n'] * eps_n
    x_sigma = x_in + sigma.reshape(-1, *[1] * (x_in.ndim - 1)) * eps
    with torch.set_grad_enabled(c['method'] == 'sid' and torch.is_grad_enabled()):   # DMD/SDS: stop-gradient
        d_real = teacher(x_sigma, sigma)
        d_fake = fake(x_sigma, sigma) if c['method'] != 'sds' else d_real
    return c['lsg'] * generator_loss(x_in, d_real, d_fake, c['method'], c['alpha'])   # Alg. 1, line 12: Eq. (2)


def find_teacher(data, sigma):
    """The convention: runs/pretrain-<data>-sigma<sigma>/latest.pt (any sigma if --sigma is not given)."""
    name = os.path.splitext(os.path.basename(os.path.normpath(data)))[0]
    pattern = os.path.join('runs', f'pretrain-{name}-sigma{"*" if sigma is None else f"{sigma:g}"}', 'latest.pt')
    found = sorted(glob.glob(pattern))
    if len(found) == 1:
        return found[0]
    if not found:
        die(f'no teacher at {pattern}; train one with `python pretrain.py --data {data} --sigma '
            f'{0.2 if sigma is None else sigma:g}` or pass --teacher PATH')
    die(f'several teachers match {pattern} ({", ".join(found)}); pass --sigma or --teacher')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='DSD Phase II: denoising score distillation into a one-step generator.')
    p.add_argument('--data', default='cifar10', help='the noisy data set of the teacher (for Proximal FID)')
    p.add_argument('--data-dir', default=None)
    p.add_argument('--sigma', type=float, default=None, help='sigma_n (default: the teacher\'s)')
    p.add_argument('--teacher', default=None, help='default runs/pretrain-<data>-sigma<sigma>/latest.pt')
    p.add_argument('--method', default='sid', help='sid (D-SiD, default) | dmd (D-DMD) | sds (D-SDS)')
    p.add_argument('--alpha', type=float, help='SiD\'s alpha (default: the recipe\'s, 1.2; AFHQ-v2 1.0)')
    p.add_argument('--loss', default=None, choices=['ambient', 'ambient-x0', 'standard'],
                   help="Eq. (3): ambient, ambient-x0 (reweighted); Eq. (1): standard. Default: the teacher's")
    p.add_argument('--force-loss', action='store_true', help='allow a --loss other than the teacher\'s')
    p.add_argument('--fake-sigma', choices=['clamp', 'above'], help='fake net\'s Eq. (3) sigma: clamped or above sigma_n')
    p.add_argument('--fake-steps', type=int, help='fake-score steps per generator step (SiD: 1; tiny, toy: 2)')
    p.add_argument('--sigma-init', type=float, help='G(z) = D(sigma_init * z; sigma_init) (default: the recipe\'s)')
    p.add_argument('--tmax', type=float, help='generator noise levels t ~ U[0, tmax/1000] (SiD: 800; toy: 450)')
    p.add_argument('--sigma-min', type=float, default=0.002, help='smallest generator noise level')
    p.add_argument('--gen-sigma-min', action='store_true', help='paper-literal: generator noise levels >= sigma_n')
    p.add_argument('--lr', type=float, help='fake-net Adam learning rate')
    p.add_argument('--glr', type=float, help='generator Adam learning rate')
    p.add_argument('--glr-end', type=float, help='not in the paper: glr falls on a cosine to this fraction of itself')
    p.add_argument('--gbeta1', type=float, help='generator Adam beta1 (SiD: 0, FFHQ / CelebA-HQ 0.9)')
    p.add_argument('--dropout', type=float, help="fake net's and G's dropout (default: recipe's, else teacher's)")
    p.add_argument('--augment', type=float, help='fake net\'s augmentation probability (default: the teacher\'s)')
    p.add_argument('--batch', type=int, help='total batch size')
    p.add_argument('--batch-gpu', type=int, default=None, help='per-process batch; smaller accumulates')
    p.add_argument('--lsg', type=float, default=100.0, help='generator loss scale')
    p.add_argument('--ema', type=float, help='generator EMA half-life, kimg')
    p.add_argument('--ema-rampup', type=float, help='EMA half-life ramp-up, a fraction of the images seen')
    p.add_argument('--kimg', type=float, help='distillation length, thousands of generator images')
    p.add_argument('--tick', type=float, help='kimg between progress lines')
    p.add_argument('--snap', type=float, help='kimg between snapshots (grid, checkpoint, Proximal FID)')
    p.add_argument('--fid-num', type=int, help='samples for Proximal FID at each snapshot (0: none)')
    p.add_argument('--features', default='auto', choices=['auto', 'inception', 'pixel'],
                   help='features for snapshot metrics; auto = pixel for tiny, toy and <=16px images')
    p.add_argument('--ref', default=None, help='clean statistics (.npz) for FID at each snapshot')
    p.add_argument('--outdir', default=None, help='default runs/distill-<data>-sigma<sigma>')
    p.add_argument('--resume', nargs='?', const='latest', default=None)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'])
    p.add_argument('--compile', action='store_true', help='torch.compile the networks')
    p.add_argument('--device', default=None)
    p.add_argument('--dry-run', action='store_true', help='print the resolved configuration and exit')
    return p.parse_args(argv)


def resolve(args):
    """Alg. 1, line 1: the teacher and the settings of this run. Returns (cfg, teacher checkpoint)."""
    if args.method not in ('sid', 'dmd', 'sds'):
        die(f'--method {args.method}: unknown; choose sid (D-SiD), dmd (D-DMD) or sds (D-SDS)')
    check_ranges(args, dict(sigma='>= 0', alpha='>= 0', sigma_init='> 0', tmax='> 0', sigma_min='> 0', lr='> 0',
                            glr='> 0', glr_end='in [0, 1]', gbeta1='in [0, 1)', dropout='in [0, 1)', batch='> 0',
                            augment='in [0, 1]', batch_gpu='> 0', fake_steps='> 0', lsg='> 0', ema='> 0', kimg='> 0',
                            ema_rampup='>= 0', tick='> 0', snap='> 0', fid_num='0 or >= 2', seed='>= 0'))
    path = args.teacher or find_teacher(args.data, args.sigma)
    teacher = load_checkpoint(path)
    if teacher.get('kind') != 'teacher':
        die(f'--teacher {path}: a {teacher.get("kind")} checkpoint; distillation needs a teacher from pretrain.py')
    tcfg, net = teacher.get('config', {}), teacher['net']
    scale = tcfg.get('data_scale', 1.0)                 # points: data units per model unit (noisy_dataset)
    sigma_n = teacher['sigma_n'] if args.sigma is None else args.sigma / scale
    if abs(sigma_n - teacher['sigma_n']) > 1e-9:
        print0(f'warning: --sigma {args.sigma:g} is not the teacher\'s sigma_n {teacher["sigma_n"] * scale:g} (mis-specified)')
    loss = args.loss or teacher['loss']
    if loss != teacher['loss'] and not args.force_loss:
        die(f'--loss {loss}: the teacher was trained with --loss {teacher["loss"]}; teacher, fake net and generator '
            f'must use the same loss (add --force-loss to override)')
    if args.fake_sigma and loss != 'ambient':
        die(f'--fake-sigma {args.fake_sigma}: only --loss ambient clamps sigma (this run\'s loss is {loss}); drop it')
    preset = tcfg.get('preset') or ('toy' if net.get('arch') == 'mlp' else 'tiny'
        if net['img_resolution'] <= 16 else 'cifar10' if net['img_resolution'] <= 32 else 'ffhq64')
    recipe = dict(RECIPES.get(preset, RECIPES['cifar10']))
    recipe.update({k: getattr(args, k) for k in recipe if getattr(args, k) is not None})   # flags over the recipe
    features = args.features if args.features != 'auto' else \
        ('pixel' if preset in ('tiny', 'toy') or net['img_resolution'] <= 16 else 'inception')   # the CPU presets
    data = teacher.get('data', args.data) if args.data == 'cifar10' and args.teacher else args.data
    name = os.path.splitext(os.path.basename(os.path.normpath(data)))[0]
    if args.augment is None:                  # SiD: the fake net augments as the teacher did
        recipe['augment'] = tcfg.get('augment', recipe['augment'] or 0.0) if net['augment_dim'] else 0
    elif args.augment and not net['augment_dim']:
        die(f'--augment {args.augment}: the teacher has no augment labels (augment_dim 0); use --augment 0')
    recipe['dropout'] = net['dropout'] if recipe['dropout'] is None else recipe['dropout']
    cfg = dict(teacher_path=path, teacher_sha256=file_sha256(path)[:16], data=data, sigma_n=float(sigma_n),
               data_scale=scale, data_shift=tcfg.get('data_shift', 0.0), loss=loss, method=args.method,
               sigma_min=max(args.sigma_min, sigma_n) if args.gen_sigma_min else args.sigma_min, lsg=args.lsg,
               seed=args.seed, precision=args.precision, features=features, ref=args.ref, preset=preset, **recipe,
               outdir=args.outdir or os.path.join('runs', f'distill-{name}-sigma{sigma_n * scale:g}'))
    return cfg, teacher


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    cfg, teacher_ckpt = resolve(args)
    if device.type == 'cpu' and teacher_ckpt['net'].get('arch') == 'mlp':
        torch.set_num_threads(1)        # the point MLP is too small for intra-op threads to pay off
    batch_gpu = split_batch(cfg['batch'], args.batch_gpu, world)
    B, shape, method = cfg['batch'], sample_shape(teacher_ckpt['net']), cfg['method']

    # Alg. 1, lines 1-2: the frozen teacher f_phi; G_theta, f_psi start as copies of its EMA weights (recipe's dropout)
    teacher, G, fake = (build_net(dict(teacher_ckpt['net'], dropout=d)) for d in (0.0, cfg['dropout'], cfg['dropout']))
    for net in (teacher, G, fake):
        net.load_state_dict(teacher_ckpt['ema'])
    teacher, G, fake = (on_device(m, device) for m in (teacher, G, fake))
    teacher.eval().requires_grad_(False)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg['glr'], betas=(cfg['gbeta1'], 0.999), eps=1e-8)
    opt_f = torch.optim.Adam(fake.parameters(), lr=cfg['lr'], betas=(0.0, 0.999), eps=1e-8)
    train_state = dict(G=G, fake=fake, opt_g=opt_g, opt_f=opt_f)
    step, best = 0, math.inf
    if args.resume:
        ck = resume_checkpoint(args.resume, cfg['outdir'], 'generator', G.config, cfg,
                               ('sigma_n', 'loss', 'method', 'seed', 'batch', 'sigma_init', 'teacher_sha256'))
        for k, v in train_state.items():   # optimizers: moments from the file, lr and betas from this run's flags
            saved = ck['state'][k]
            v.load_state_dict(dict(saved, param_groups=v.state_dict()['param_groups']) if 'opt' in k else saved)
        G_ema.load_state_dict(ck['ema'])
        step, best = ck['state']['step'], ck['state']['best']
    if args.dry_run:                                   # after --resume was checked
        print0(json.dumps(dict(config=cfg, teacher_net=teacher_ckpt['net'], world=world, batch_gpu=batch_gpu), indent=2))
        return
    wrap = lambda m: torch.nn.parallel.DistributedDataParallel(
        m, device_ids=[device] if device.type == 'cuda' else None) if world > 1 else m
    G_ddp, fake_ddp = wrap(G), wrap(fake)
    run = torch.compile if args.compile else lambda m: m                 # what the steps call
    G_fwd, fake_fwd, teacher_fwd = run(G_ddp), run(fake_ddp), run(teacher)
    dtype = torch.bfloat16 if cfg['precision'] == 'bf16' else None
    total, tick, snap = (steps_of(cfg[k], B) for k in ('kimg', 'tick', 'snap'))

    start_run(cfg['outdir'], dict(config=cfg, world=world, batch_gpu=batch_gpu), rank, args.resume and ck)
    # Model selection without clean data (Sec. 4.4): the noisy training set's statistics, computed once, up front.
    refs = dict(inception=None, noisy=None, clean=load_stats(cfg['ref'], cfg['features']) if cfg['ref'] else None)
    if cfg['fid_num'] and cfg['sigma_n'] > 0 and rank == 0:
        refs['inception'] = load_inception(device=device) if cfg['features'] == 'inception' else None
        refs['noisy'] = noisy_reference(teacher_ckpt, cfg['data'], args.data_dir, cfg['features'], device,
                                        refs['inception'])
    print0(f'distilling {cfg["teacher_path"]} (sigma_n={cfg["sigma_n"]:g}, loss={cfg["loss"]}) with '
           f'D-{method.upper()}: {total} steps of {B} on {world} x {device.type}')

    run_start = tick_start = time.time()
    sums = dict(loss_fake=0.0, loss_gen=0.0, images=0, nonfinite=0)
    while step < total:                                                        # Alg. 1, line 3: repeat
        g = step_generator(cfg['seed'], step)
        for k in range(cfg['fake_steps'] if method != 'sds' else 0):   # Alg. 1, lines 4-9 (D-SDS: no fake net)
            sigma = sample_sigma(B, cfg['sigma_n'], cfg['loss'], g, cfg['fake_sigma'] == 'above')
            eps_n, eps, z = (torch.randn((B, *shape), generator=g) for _ in range(3))
            choices, labels = augment_choices(B, cfg['augment'], shape[-1], g) if cfg['augment'] else (None, None)
            G.eval()                                                           # as SiD: no dropout while G serves
            fake.train().requires_grad_(True)
            out = optimize(opt_f, fake, fake_ddp, lambda *b: fake_score_step(G_fwd, fake_fwd, *b, cfg),
                           (z, eps_n, sigma, eps, choices, labels), (cfg['seed'], step, 1 + 2 * k), rank, world,
                           batch_gpu, device, dtype)
            sums['loss_fake'] += out[0] / cfg['fake_steps']
        sigma = sid_sigmas(B, g, cfg['tmax'], cfg['sigma_min'])                # Alg. 1, lines 10-12: generator step
        z, eps_n, eps = (torch.randn((B, *shape), generator=g) for _ in range(3))
        cosine = (1 + math.cos(math.pi * step / total)) / 2        # not in the paper: glr falls to glr_end x glr
        opt_g.param_groups[0]['lr'] = cfg['glr'] * (cfg['glr_end'] + (1 - cfg['glr_end']) * cosine)
        G.train()
        fake.eval().requires_grad_(False)
        out = optimize(opt_g, G, G_ddp, lambda *b: generator_step(G_fwd, teacher_fwd, fake_fwd, *b, cfg),
                       (z, eps_n, sigma, eps), (cfg['seed'], step, 2), rank, world, batch_gpu, device, dtype)
        step += 1
        update_ema(G_ema, G, ema_beta(B, step * B, cfg['ema'], cfg['ema_rampup']))   # Alg. 1, line 13
        sums['loss_gen'] += out[0] / cfg['lsg']
        sums['images'] += out[1]
        sums['nonfinite'] += out[2]
        if step % tick == 0 or step == total:
            rec = log_tick(cfg['outdir'], sums, step, total, B, tick_start, run_start, device, rank, world)
            if rec['nonfinite'] >= rec['images'] > 0:
                die(f'every generator sample of the last tick had a non-finite loss (at {step} steps); lower --glr '
                    f'/ --lr or resume from the last snapshot')
            tick_start, sums = time.time(), dict.fromkeys(sums, 0)
        if step % snap == 0 or step == total:
            if rank == 0:
                best = snapshot(cfg, step, best, G_ema, train_state, teacher_ckpt, refs, device)
            if world > 1:
                dist.barrier()
    print0(f'done: {os.path.join(cfg["outdir"], "latest.pt")}')   # Alg. 1, line 14: the EMA generator is the model
    end_distributed(world)


def snapshot(cfg, step, best, G_ema, train_state, teacher_ckpt, refs, device):
    """Rank 0: Proximal FID (and FID with --ref), latest.pt, best.pt by Proximal FID (Sec. 4.4), a preview."""
    kimg = step * cfg['batch'] / 1000
    ckpt = dict(format='dsd-1', kind='generator', net=G_ema.config, ema=G_ema.state_dict(),
                sigma_n=cfg['sigma_n'], loss=cfg['loss'], sigma_init=cfg['sigma_init'], method=cfg['method'],
                teacher=teacher_ckpt['net'], data=cfg['data'], kimg=kimg, config=cfg, metrics={})
    if refs['noisy'] is not None:
        ckpt['metrics']['proximal_fd'] = proximal(G_ema, ckpt, refs['noisy'], cfg['fid_num'], cfg['features'], device,
                                                  refs['inception'])
    if refs['clean'] is not None:
        feats = generated_features(G_ema, ckpt, list(range(cfg['fid_num'])), cfg['features'], device, refs['inception'])
        ckpt['metrics']['fid'] = frechet_distance(*stats_of(feats), *refs['clean'])
    score = ckpt['metrics'].get('proximal_fd', math.inf)
    kind = label_of(cfg['features'], G_ema.config['arch'] == 'mlp')
    names = dict(proximal_fd=f'proximal {kind}', fid=kind)
    print0(f'snapshot {kimg:.2f} kimg  ' + '  '.join(f'{names[k]} {v:.4f}' for k, v in ckpt['metrics'].items()))
    with open(os.path.join(cfg['outdir'], 'metrics.jsonl'), 'a') as f:
        f.write(json.dumps(dict(kimg=kimg, **ckpt['metrics'])) + '\n')
    if score < best or score == best == math.inf:          # without metrics, best.pt is the latest
        save_checkpoint(os.path.join(cfg['outdir'], 'best.pt'), ckpt)
    # latest.pt last: a run killed before it resumes from the snapshot before, which rewrites the above
    state = dict({k: v.state_dict() for k, v in train_state.items()}, step=step, best=min(best, score))
    write_snapshot(cfg['outdir'], dict(ckpt, state=state), G_ema, device)
    return min(best, score)


if __name__ == '__main__':
    main()
