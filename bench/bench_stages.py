"""Throughput of the stages on this machine: distillation iterations/s and img/s, and sampling time for 1000
samples from a teacher (Heun, 35 evaluations) against the one-step generator.

    python bench/bench_stages.py                        # tiny preset (16x16), CPU
    python bench/bench_stages.py --preset cifar10 --device cuda --batch 256 --precision bf16
Random weights are enough: the cost of a step does not depend on what the nets have learned.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import distill  # noqa: E402
import networks  # noqa: E402
import sample  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--preset', default='tiny')
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--num', type=int, default=1000, help='samples for the sampling benchmark')
    p.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    a = p.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    net = networks.build_net(networks.PRESETS[a.preset]['net'])
    with tempfile.TemporaryDirectory() as tmp:
        teacher = os.path.join(tmp, 'teacher.pt')
        networks.save_checkpoint(teacher, dict(format='dsd-1', kind='teacher', net=net.config, ema=net.state_dict(),
                                               sigma_n=0.2, loss='ambient', data='shapes', kimg=0.0))
        run = lambda n: distill.main(['--teacher', teacher, '--data', 'shapes', '--batch', str(a.batch),
                                      '--kimg', str(n * a.batch / 1000), '--snap', '1e9', '--tick', '1e9',
                                      '--fid-num', '0', '--precision', a.precision, '--device', a.device,
                                      '--outdir', os.path.join(tmp, f'run{n}')])
        t0 = time.time(); run(2); t1 = time.time(); run(2 + a.iters); t2 = time.time()
        per_iter = ((t2 - t1) - (t1 - t0)) / a.iters                 # start-up and snapshots cancel out
        print(f'distill {a.preset} batch {a.batch} {a.precision} on {dev}: {1 / per_iter:.2f} it/s, '
              f'{a.batch / per_iter:.1f} generator img/s')
        gen = dict(format='dsd-1', kind='generator', net=net.config, ema=net.state_dict(), sigma_n=0.2,
                   loss='ambient', sigma_init=2.5, teacher=net.config, data='shapes', kimg=0.0)
        tck = dict(gen, kind='teacher')
        net = net.to(dev).eval().requires_grad_(False)
        seeds = list(range(a.num))
        times = {}
        for name, ck, mode in (('teacher, Heun 18 steps (35 evals)', tck, 'full'), ('one-step generator', gen, None)):
            t = time.time()
            for _ in sample.generate(net, ck, seeds, 250, dev, mode):
                pass
            if dev.type == 'cuda':
                torch.cuda.synchronize()
            times[name] = time.time() - t
            print(f'{a.num} samples, {name}: {times[name]:.2f} s ({a.num / times[name]:.0f} img/s)')
        print(f'one-step speed-up: {times["teacher, Heun 18 steps (35 evals)"] / times["one-step generator"]:.1f}x')


if __name__ == '__main__':
    main()
