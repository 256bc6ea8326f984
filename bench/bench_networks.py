"""CPU training throughput and peak memory of networks.EDMPrecond (optionally vs EDM's own, same weights).

  python bench/bench_networks.py                           # ours only: cifar10 @ batch 8, tiny @ batch 64
  python bench/bench_networks.py --edm /path/to/edm        # also EDM's EDMPrecond(SongUNet DDPM++) from a checkout

Each (preset, implementation) runs in a fresh subprocess so that peak RSS (ru_maxrss) belongs to it alone.
Time per step is the best of --steps (this box is shared; the best is the least disturbed). One training step = EDM loss on random data (forward) + backward + Adam step. EDM code is imported only
when --edm is given (it is not part of this project).
"""
import argparse, json, os, resource, subprocess, sys, time

def worker(a):
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(a.networks)))
    import networks
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    cfg = networks.PRESETS[a.preset]['net']
    if a.impl == 'edm':
        sys.path.insert(0, a.edm)
        from training import networks as edm
        net = edm.EDMPrecond(img_resolution=cfg['img_resolution'], img_channels=cfg['img_channels'], label_dim=0,
            model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
            channel_mult_noise=1, resample_filter=[1, 1], model_channels=cfg['model_channels'],
            channel_mult=cfg['channel_mult'], num_blocks=cfg['num_blocks'], attn_resolutions=cfg['attn_resolutions'],
            dropout=cfg['dropout'], augment_dim=cfg['augment_dim'])
        call = lambda x, s, aug: net(x, s, augment_labels=aug)
    else:
        net = networks.EDMPrecond(**cfg)
        call = lambda x, s, aug: net(x, s, aug)
    sd = torch.load(a.weights, weights_only=True)  # the same weights for both implementations
    net.load_state_dict({**net.state_dict(), **sd}, strict=True)
    del sd
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    r, c, b = cfg['img_resolution'], cfg['img_channels'], a.batch
    g = torch.Generator().manual_seed(1)
    def step():
        y = torch.rand(b, c, r, r, generator=g) * 2 - 1
        sigma = (torch.randn(b, generator=g) * 1.2 - 1.2).exp()
        aug = torch.randn(b, 9, generator=g) if cfg['augment_dim'] else None
        w = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
        d = call(y + sigma.reshape(-1, 1, 1, 1) * torch.randn(y.shape, generator=g), sigma, aug)
        loss = (w.reshape(-1, 1, 1, 1) * (d - y) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    saved = {}  # bytes kept for backward (activations), counted once per storage: load-independent
    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    for _ in range(a.warmup - 1):
        step()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
    print(json.dumps(dict(preset=a.preset, impl=a.impl, batch=b, img_s=b / min(times),
                          step_s=min(times), rss_before_mb=rss0, saved_mb=sum(saved.values()) / 2**20,
                          peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--edm', default=None, help='path to an EDM checkout (optional; enables the comparison)')
    p.add_argument('--networks', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'networks.py'))
    p.add_argument('--runs', default='cifar10:8,tiny:64', help='preset:batch,...')
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--warmup', type=int, default=1, help='untimed steps (>= 1; the first one also counts activation memory)')
    p.add_argument('--repeats', type=int, default=2, help='alternating repeats per implementation (best is kept)')
    p.add_argument('--threads', type=int, default=os.cpu_count())
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--preset'); p.add_argument('--batch', type=int); p.add_argument('--impl'); p.add_argument('--weights')
    a = p.parse_args()
    if a.worker:
        return worker(a)
    if not os.path.isfile(a.networks):
        sys.exit(f'error: --networks {a.networks}: no such file; point it at networks.py')
    if a.edm and not os.path.isfile(os.path.join(a.edm, 'training', 'networks.py')):
        sys.exit(f'error: --edm {a.edm}: no training/networks.py there; give the root of an EDM checkout')
    impls = ['ours', 'edm'] if a.edm else ['ours']
    import tempfile, torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(a.networks)))
    import networks
    for run in a.runs.split(','):
        preset, batch = run.split(':')
        weights = os.path.join(tempfile.mkdtemp(), 'w.pt')
        torch.manual_seed(0)
        torch.save(networks.EDMPrecond(**networks.PRESETS[preset]['net']).state_dict(), weights)
        best = {}
        for rep in range(a.repeats):
            for impl in (impls if rep % 2 == 0 else impls[::-1]):
                cmd = [sys.executable, os.path.abspath(__file__), '--worker', '--preset', preset, '--batch', batch,
                       '--impl', impl, '--steps', str(a.steps), '--warmup', str(a.warmup), '--threads', str(a.threads),
                       '--networks', a.networks, '--weights', weights] + (['--edm', a.edm] if a.edm else [])
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f'error: worker {impl} {preset} failed:\n{out.stderr[-2000:]}')
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if impl not in best or r['img_s'] > best[impl]['img_s']:
                    best[impl] = dict(r, peak_rss_mb=min(r['peak_rss_mb'], best.get(impl, r)['peak_rss_mb']))
        os.unlink(weights); os.rmdir(os.path.dirname(weights))
        for impl, r in best.items():
            print(f"{preset:8s} batch {r['batch']:3d} {impl:4s}: {r['img_s']:8.2f} img/s ({r['step_s']:.3f} s/step), "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB, saved for backward {r['saved_mb']:.0f} MB")
        if 'edm' in best:
            o, e = best['ours'], best['edm']
            print(f"{preset:8s} ours/EDM: speed x{o['img_s'] / e['img_s']:.2f}, peak RSS x{o['peak_rss_mb'] / e['peak_rss_mb']:.2f}, "
                  f"saved for backward x{o['saved_mb'] / e['saved_mb']:.2f}")

if __name__ == '__main__':
    main()
