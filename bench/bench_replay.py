"""Where does a distillation blow up? Replays a stretch of a run from one of its snapshots, step by step.

A distillation's latest.pt holds all it needs to continue exactly (resuming is exact), so the steps after a snapshot
can be run again with a log of every optimizer step: the loss of the generator and of the fake net, and the size of
each update (the L2 norm of the change in the weights). Flags after `--` replay the same stretch under another
setting; `distill.py --resume` takes new learning rates and betas from its flags.

    cp RUN/latest.pt before.pt   # a snapshot from before the jump (bench_snapshots.py keeps every one)
    python bench/bench_replay.py before.pt --steps 125                 # the stretch as the run went
    python bench/bench_replay.py before.pt --steps 125 -- --lr 1e-4    # the same stretch, the fake net's lr 3x lower

It prints each generator step at which an update of either net is over --factor times that net's median over the
stretch, then the median and largest update of each net and the generator's lowest loss. Runs go under --out.
"""
import argparse
import os
import shutil
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distill  # noqa: E402

# The settings a distillation's config records and distill.py takes back as flags (--fake-sigma: the ambient loss).
KEYS = ('loss', 'method', 'lr', 'glr', 'gbeta1', 'alpha', 'sigma_init', 'ema', 'ema_rampup', 'kimg', 'glr_end',
        'fake_steps', 'batch', 'dropout', 'augment', 'tmax', 'sigma_min', 'lsg', 'seed', 'precision', 'tick')


class Done(Exception):
    pass


def run_args(cfg, outdir):
    """distill.py's arguments that continue the run of config cfg in outdir, Proximal FID off, no snapshot before
    the run's end."""
    args = ['--teacher', cfg['teacher_path'], '--data', cfg['data'], '--outdir', outdir, '--resume', '--fid-num', '0',
            '--snap', str(cfg['kimg'])]
    args += [x for k in KEYS for x in (f'--{k.replace("_", "-")}', str(cfg[k]))]
    return args + (['--fake-sigma', cfg['fake_sigma']] if cfg['loss'] == 'ambient' else [])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('snapshot', help='a distillation checkpoint with its training state (latest.pt or a copy)')
    p.add_argument('--steps', type=int, default=125, help='generator steps to replay')
    p.add_argument('--factor', type=float, default=5.0, help='report updates over this times the median')
    p.add_argument('--out', default=os.path.join('runs', 'bench-replay'))
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    a = p.parse_args(argv[:argv.index('--')] if '--' in argv else argv)
    ck = torch.load(a.snapshot, weights_only=True)
    if ck.get('kind') != 'generator' or 'state' not in ck:
        sys.exit(f'error: {a.snapshot}: not a distillation checkpoint with training state (distill.py latest.pt)')
    cfg, start = ck['config'], ck['state']['step']
    outdir = os.path.join(a.out, '_'.join(x.lstrip('-') for x in extra) or 'as-run')
    shutil.rmtree(outdir, ignore_errors=True)
    os.makedirs(outdir)
    shutil.copy(a.snapshot, os.path.join(outdir, 'latest.pt'))
    rows = []                                           # (step, 'G' or 'fake', mean loss, update size)

    optimize = distill.optimize

    def logged(opt, net, ddp, loss_fn, tensors, seed, *rest):
        before = [q.detach().clone() for q in net.parameters()]
        total, done, bad = optimize(opt, net, ddp, loss_fn, tensors, seed, *rest)
        size = sum(float(((q.detach() - b) ** 2).sum()) for q, b in zip(net.parameters(), before)) ** 0.5
        is_g = seed[2] == 2                             # distill.py seeds the generator step's dropout with 2
        rows.append((seed[1], 'G' if is_g else 'fake', total / max(done, 1) / (cfg['lsg'] if is_g else 1), size))
        if is_g and seed[1] + 1 >= start + a.steps:
            raise Done
        return total, done, bad

    distill.optimize = logged                           # the replay's one change to distill.py, undone below
    try:
        distill.main(run_args(cfg, outdir) + extra)
    except Done:
        pass
    finally:
        distill.optimize = optimize
    med = {n: np.median([r[3] for r in rows if r[1] == n]) for n in ('G', 'fake')}
    print(f'replayed steps {start}-{rows[-1][0]} of {cfg["outdir"]} {" ".join(extra)}'.rstrip())
    print(f'{"step":>6} {"loss_fake":>10} {"loss_gen":>10} {"|dG|/med":>9} {"|dfake|/med":>11}')
    for step in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == step]
        fake = [r for r in mine if r[1] == 'fake']
        g = [r for r in mine if r[1] == 'G']
        dg = g[0][3] / med['G'] if g else 0.0
        df = max((r[3] for r in fake), default=0.0) / med['fake']
        if dg > a.factor or df > a.factor:
            print(f'{step:>6} {np.mean([r[2] for r in fake]) if fake else float("nan"):>10.4f} '
                  f'{g[0][2] if g else float("nan"):>10.4f} {dg:>9.1f} {df:>11.1f}')
    for n in ('G', 'fake'):
        sizes = [r[3] for r in rows if r[1] == n]
        print(f'{n}: median update {med[n]:.4g}, largest {max(sizes):.4g} ({max(sizes) / med[n]:.1f}x)')
    print(f'lowest generator loss {min(r[2] for r in rows if r[1] == "G"):.4g}')
    return rows


if __name__ == '__main__':
    main()
