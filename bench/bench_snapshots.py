"""Does Proximal FD (Sec. 4.4, model selection without clean data) pick the right snapshot of a distillation?

On one set that bench_recipe.py makes, this trains the teacher and distills it at today's defaults (seeded with
--seed), keeping a copy of every snapshot, then scores each snapshot: Proximal FD as distill.py computes it, at
--num samples on --draws disjoint sets of seeds and once at 5x --num, against the FD of its samples to the fresh
clean set (what bench_recipe.py's tables report). It prints one row per snapshot and what each score would pick.

    python bench/bench_snapshots.py --set curves --seed 1      # 12 min on one core beside another run (7 until 12-07)
    python bench/bench_snapshots.py --set smooth               # images, the tiny recipes: 80 minutes on one core
                                                               # of a slow day (2.5x Benchmarks' times)

Runs go under --out (default runs/bench-snapshots); a finished teacher or distillation is reused, an interrupted
distillation resumes.
"""
import argparse
import glob
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_recipe as br  # noqa: E402
import distill             # noqa: E402
import fid                 # noqa: E402
import sample              # noqa: E402


def keep_every_snapshot(outdir, ckpt, ema, device, write=distill.write_snapshot):
    """distill.write_snapshot, then a copy of latest.pt named by its kimg."""
    write(outdir, ckpt, ema, device)
    shutil.copy(os.path.join(outdir, 'latest.pt'), os.path.join(outdir, f'snap-{ckpt["kimg"]:010.3f}kimg.pt'))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--set', default='curves', choices=[s for s in br.SETS if s != 'photo'])
    p.add_argument('--seed', default='0', help='the teacher\'s and the distillation\'s --seed')
    p.add_argument('--num', type=int, default=2000, help='samples per Proximal FD (distill.py\'s --fid-num)')
    p.add_argument('--draws', type=int, default=3, help='disjoint sets of seeds Proximal FD is computed on')
    p.add_argument('--out', default=os.path.join('runs', 'bench-snapshots'))
    p.add_argument('--quick', action='store_true', help='a smoke test: tiny sets and budgets')
    p.add_argument('--threads', type=int, default=1, help='CPU threads (1: two runs can share 2 cores)')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    data, fresh_path = br.write_set(a.set, a.out, 300 if a.quick else 20000, 200 if a.quick else 2000)
    quick_t, quick_d = (['--kimg', '0.5', '--tick', '0.25'], ['--kimg', '0.128', '--snap', '0.032', '--tick', '0.032',
                         '--fid-num', '100', '--batch', '32']) if a.quick else ([], [])
    teacher_dir, out = (os.path.join(a.out, f'{a.set}-seed{a.seed}-{k}') for k in ('teacher', 'distill'))
    br.script('pretrain.py', teacher_dir, '--data', data, '--sigma', str(br.SIGMA), '--device', 'cpu', '--seed', a.seed,
              *quick_t, threads=a.threads)
    teacher = os.path.join(teacher_dir, 'latest.pt')
    finished = os.path.join(out, 'finished')
    if not os.path.isfile(finished):                    # an interrupted distillation resumes from its last snapshot
        distill.write_snapshot = keep_every_snapshot
        resume = ['--resume'] if os.path.isfile(os.path.join(out, 'latest.pt')) else []
        distill.main(['--data', data, '--teacher', teacher, '--device', 'cpu', '--seed', a.seed, '--outdir', out,
                      *resume, *quick_d])
        open(finished, 'w').close()

    noisy = fid.noisy_reference(torch.load(teacher, weights_only=True), data, None, 'pixel', 'cpu')
    spec = dict(set=a.set, fresh=fresh_path)
    fresh, support = br.references(spec)
    counts = [(k * a.num, (k + 1) * a.num) for k in range(a.draws)] + [(0, 5 * a.num)]
    heads = [f'prox {lo}-{hi - 1}' for lo, hi in counts] + ['FD to clean']
    rows = []
    for path in sorted(glob.glob(os.path.join(out, 'snap-*.pt'))):
        net, ckpt = sample.load_net(path, 'cpu')
        prox = [fid.proximal(net, ckpt, noisy, hi - lo, 'pixel', first=lo) for lo, hi in counts]   # as distill.py
        clean = br.distances(br.samples(spec, path, len(fresh)), fresh, support)['fd']
        rows.append((ckpt['kimg'], *prox, clean))
        print(f'{ckpt["kimg"]:9.3f} kimg  ' + '  '.join(f'{h} {v:8.3f}' for h, v in zip(heads, rows[-1][1:])),
              flush=True)
    print(f'\n{a.set}, seed {a.seed}: the snapshot each score picks, and its FD to clean (the last: '
          f'{rows[-1][-1]:.3f} at {rows[-1][0]:g} kimg)')
    for i, h in enumerate(heads):
        pick = min(rows, key=lambda r: r[i + 1])
        print(f'{h:16s} picks {pick[0]:9.3f} kimg: FD to clean {pick[-1]:.3f}')


if __name__ == '__main__':
    main()
