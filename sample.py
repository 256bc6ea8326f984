"""Sampling (Algorithm 3): Ambient-Full and Ambient-Truncated from a teacher, one step from a DSD generator;
writing samples, grids and scatter plots.

    python sample.py --net runs/distill-toy-sigma0.2/best.pt --seeds 0-999 --out samples.npz
    torchrun --nproc_per_node=4 sample.py --net gen.pt --seeds 0-49999 --out samples/

Every sample depends only on its seed: not on the batch size, nor on the number of processes.
(The paper's Fig. 2 / Fig. 4 side-by-side pictures with their distances: `python fid.py figure`.)
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

from networks import build_net, die, init_distributed, load_checkpoint, print0


def parse_seeds(text):
    """'0-49999' or '1,5,10-19' -> list of ints."""
    seeds = []
    try:
        for part in text.split(','):
            lo, _, hi = part.partition('-')
            lo, hi = int(lo), int(hi) if hi else int(lo)
            if hi < lo or lo < 0:
                raise ValueError
            seeds.extend(range(lo, hi + 1))
    except ValueError:
        die(f'--seeds {text}: expected non-negative seeds as "A-B" (A <= B) or "1,2,5-9"')
    return seeds


def load_net(path, device, kind=None):
    """A checkpoint -> (EMA network in eval mode, the checkpoint dict)."""
    ckpt = load_checkpoint(path)
    if ckpt.get('kind') not in ('teacher', 'generator'):
        die(f'{path}: neither a teacher nor a generator checkpoint (kind={ckpt.get("kind")!r})')
    if kind is not None and ckpt['kind'] != kind:
        die(f'{path}: a {ckpt["kind"]} checkpoint, but a {kind} is needed here')
    net = build_net(ckpt['net'])
    net.load_state_dict(ckpt['ema'])
    return net.to(device).eval().requires_grad_(False), ckpt


def latents(seeds, shape):
    """One standard-normal tensor per seed, stacked: the batch does not change what a seed gives."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def karras_sigmas(steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Alg. 3, line 2: EDM's time steps sigma_0 > ... > sigma_{N-1}, then sigma_N = 0."""
    i = torch.arange(steps, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sampler(net, z, steps=18, sigma_stop=None, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's deterministic 2nd-order sampler. sigma_stop=sigma_n gives Ambient-Truncated: stop at the first step
    whose next level is below sigma_n and return the denoised estimate, the posterior mean E[x0 | x]."""
    t = karras_sigmas(steps, sigma_min, sigma_max, rho).to(z.device)
    x = z.double() * t[0]                                                      # Alg. 3, line 3
    denoise = lambda x, s: net(x.float(), s.float().expand(len(x))).double()
    for i in range(steps):                                                     # Alg. 3, line 4
        t_cur, t_next = t[i], t[i + 1]
        if sigma_stop is not None and t_next < sigma_stop:                     # Alg. 3, line 5: Ambient-Truncated
            return denoise(x, t_cur).float()
        d = (x - denoise(x, t_cur)) / t_cur                                    # Alg. 3, line 6
        x_next = x + (t_next - t_cur) * d                                      # Alg. 3, line 7: Euler step
        if t_next > 0:                                                         # Alg. 3, line 8: Heun correction
            x_next = x + (t_next - t_cur) * 0.5 * (d + (x_next - denoise(x_next, t_next)) / t_next)
        x = x_next
    return x.float()                                                           # Alg. 3, line 9: Ambient-Full


def one_step(net, z, sigma_init):
    """The DSD generator: x_g = G_theta(sigma_init * z) = D_theta(sigma_init * z; sigma_init), one evaluation."""
    return net(z * sigma_init, torch.full((len(z),), float(sigma_init), device=z.device))


def default_steps(ckpt):
    return 40 if ckpt['net'].get('img_resolution', 0) >= 64 else 18


def sample_shape(net_config):
    """The shape of one sample: (C, H, W) for images, (D,) for points."""
    c, r = net_config['img_channels'], net_config['img_resolution']
    return (c,) if net_config.get('arch') == 'mlp' else (c, r, r)


@torch.no_grad()
def generate(net, ckpt, seeds, batch, device, mode=None, steps=None):
    """Yield (seeds, samples in model units on the CPU) batch by batch. mode: full|truncated for teachers."""
    shape = sample_shape(ckpt['net'])
    for i in range(0, len(seeds), batch):
        part = seeds[i:i + batch]
        z = latents(part, shape).to(device)
        if ckpt['kind'] == 'generator':
            x = one_step(net, z, ckpt['sigma_init'])
        else:
            stop = ckpt['sigma_n'] if (mode or 'truncated') == 'truncated' and ckpt['sigma_n'] > 0 else None
            x = heun_sampler(net, z, steps or default_steps(ckpt), sigma_stop=stop)
        yield part, x.float().cpu()


def to_uint8(x):
    """Float images in [-1, 1], NCHW (numpy or torch) -> uint8 NHWC: clip, then round((x + 1) * 127.5).
    Data, noisy data and samples all take this one path, to PNGs and to the FID network alike."""
    x = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    return np.rint((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)


def grid_image(images_u8):
    """uint8 NHWC -> one Pillow image, as square a grid as possible; images under 64 px are enlarged
    (nearest neighbour, at least 64 px a side) so that a person can see them."""
    n, h, w, c = images_u8.shape
    cols = int(np.ceil(np.sqrt(n)))
    grid = np.full((-(-n // cols) * h, cols * w, c), 255, np.uint8)
    for k in range(n):
        grid[(k // cols) * h:(k // cols + 1) * h, (k % cols) * w:(k % cols + 1) * w] = images_u8[k]
    scale = max(1, -(-64 // h))
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    return Image.fromarray(grid.squeeze(-1) if c == 1 else grid)


def scatter(points, size=320, lim=1.9, background=None, colour=(30, 90, 200), title=None):
    """Points as a Pillow image on [-lim, lim]^2: the first two coordinates (1-D points: against their index)."""
    points = np.asarray(points) if np.shape(points)[1] > 1 else np.c_[points, np.linspace(lim, -lim, len(points))]
    img = Image.new('RGB', (size, size), 'white')
    draw = ImageDraw.Draw(img)
    to_px = lambda p: ((p[:, 0] + lim) / (2 * lim) * (size - 1), (lim - p[:, 1]) / (2 * lim) * (size - 1))
    if background is not None:                         # the clean support, as a faint line
        bg = np.asarray(background)
        px, py = to_px(bg)
        for i in np.flatnonzero(np.hypot(*(bg[1:] - bg[:-1]).T) < 0.05):
            draw.line((px[i], py[i], px[i + 1], py[i + 1]), fill=(190, 190, 190), width=6)
    for x, y in zip(*to_px(points)):
        draw.rectangle((x - 1, y - 1, x + 1, y + 1), fill=colour)
    draw.rectangle((0, 0, size - 1, size - 1), outline=(120, 120, 120))
    if title:
        draw.text((6, 4), title, fill=(0, 0, 0))
    return img


def save_preview(net, ckpt, path, device, n=None):
    """What a snapshot looks like: a grid of 64 images, or 2000 points. Fixed seeds, so snapshots compare."""
    points = ckpt['net'].get('arch') == 'mlp'
    n = n or (2000 if points else 64)
    x = torch.cat([x for _, x in generate(net, ckpt, list(range(n)), 500, device)])
    (scatter(x.numpy(), title=os.path.basename(path)) if points else grid_image(to_uint8(x))).save(path)


def data_units(points, ckpt):
    """Points from the model units the nets work in back to the data's (pretrain.noisy_dataset's scale and shift)."""
    c = ckpt.get('config', {})
    return points * c.get('data_scale', 1.0) + np.float32(c.get('data_shift', 0.0))


def writable_image(path):     # an image format PIL can write, in a folder that exists: checked before sampling
    ext = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    return ext in Image.SAVE and os.path.isdir(os.path.dirname(os.path.abspath(path)))


def write_samples(out, seeds, x):
    """--out DIR: PNGs in subfolders of 1000 as EDM does; --out FILE.npz handled by the caller."""
    for s, im in zip(seeds, to_uint8(x)):
        folder = os.path.join(out, f'{s - s % 1000:06d}')
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).save(os.path.join(folder, f'{s:06d}.png'))


def main(argv=None):
    p = argparse.ArgumentParser(description='Algorithm 3: Ambient-Full/-Truncated teacher samples, one-step generators.')
    p.add_argument('--net', required=True, help='a teacher (pretrain.py) or generator (distill.py) checkpoint')
    p.add_argument('--mode', choices=['full', 'truncated'], default=None,
                   help='teachers: full = Heun to sigma 0 (Ambient-Full); truncated = stop at sigma_n and return '
                        'the posterior mean (Ambient-Truncated, default)')
    p.add_argument('--steps', type=int, default=None, help='Heun steps (default 18 at 32x32, 40 at 64x64)')
    p.add_argument('--seeds', default='0-63', help='e.g. 0-49999')
    p.add_argument('--batch', type=int, default=256, help='samples per forward pass and process')
    p.add_argument('--out', default=None, help='a folder for PNGs, or FILE.npz (array "samples")')
    p.add_argument('--grid', default=None, help='FILE.png: a grid (or scatter plot) of the samples')
    p.add_argument('--device', default=None)
    p.add_argument('--dry-run', action='store_true', help='print the resolved configuration and exit')
    args = p.parse_args(argv)
    if args.batch < 1 or args.steps is not None and args.steps < 1:
        die(f'--batch {args.batch}, --steps {args.steps}: each must be >= 1')
    seeds = parse_seeds(args.seeds)
    bad_out = (args.out or '').lower().endswith(('.png', '.jpg', '.npy')) or not (args.out or args.grid or args.dry_run)
    if bad_out or args.grid and not writable_image(args.grid):
        die(f'--out {args.out}, --grid {args.grid}: give --out a folder or FILE.npz, and/or --grid FILE.png (in a '
            'folder that exists)')
    rank, world, device = init_distributed(args.device)
    net, ckpt = load_net(args.net, device)
    if device.type == 'cpu' and ckpt['net'].get('arch') == 'mlp':
        torch.set_num_threads(1)        # the point MLP is too small for intra-op threads to pay off
    if args.mode and ckpt['kind'] == 'generator':
        die(f'--mode {args.mode}: {args.net} is a one-step generator; --mode applies to teachers')
    if ckpt['net'].get('arch') == 'mlp' and args.out and not args.out.endswith('.npz'):
        die(f'--out {args.out}: points are written to a FILE.npz (PNG folders are for images)')
    if args.dry_run:
        print0(dict(net=args.net, kind=ckpt['kind'], sigma_n=ckpt.get('sigma_n'), steps=args.steps or
                    default_steps(ckpt), mode=args.mode or ('one-step' if ckpt['kind'] == 'generator' else 'truncated'),
                    batch=args.batch, seeds=f'{seeds[0]}-{seeds[-1]} ({len(seeds)})', world=world))
        return
    mine = seeds[rank::world]                                            # torchrun splits the seeds
    t0, done, parts = time.time(), 0, []
    for part, x in generate(net, ckpt, mine, args.batch, device, args.mode, args.steps):
        done += len(part)
        if args.out and not args.out.endswith('.npz'):
            write_samples(args.out, part, x)
        if (args.out or '').endswith('.npz') or args.grid:
            parts.append((part, x))
        print0(f'\r{done * world}/{len(seeds)}  {done / (time.time() - t0):.1f} samples/s per process', end='')
    print0()
    if parts:
        order, x = [s for pt, _ in parts for s in pt], torch.cat([x for _, x in parts])
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, (order, x))
            order = [s for o, _ in gathered for s in o]
            x = torch.cat([x for _, x in gathered])
        x = x[np.argsort(order, kind='stable')]
        if rank == 0 and (args.out or '').endswith('.npz'):
            arr = to_uint8(x) if x.ndim == 4 else data_units(x.numpy(), ckpt)
            np.savez(args.out, samples=arr)
            print0(f'wrote {args.out}: samples {arr.dtype} {arr.shape}')
        if rank == 0 and args.grid:
            (scatter(x.numpy()) if x.ndim == 2 else grid_image(to_uint8(x[:256]))).save(args.grid)
            print0(f'wrote {args.grid}')
    if world > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
