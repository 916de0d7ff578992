"""Throughput of our MambaOut against timm's: same variant, same weights, same input.

Training steps are forward + backward + optimizer step; inference steps a forward pass under
`torch.inference_mode`. After a warm-up the two models run in alternating rounds (the order
flips each round) and the table reports median images per second and the median of the
per-round ratios ours / timm.

    python benchmarks/model_throughput.py --models mambaout_femto --batch-size 16 --image-size 224
"""
import argparse
import datetime
import json
import platform
import statistics
import time
from contextlib import nullcontext
from typing import Callable, Dict, List

import timm
import torch
import torch.nn.functional as F
from torch import nn

from mambaout_pl.models import create_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=['mambaout_femto'], help='MambaOut variant names')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=5, help='alternating rounds per model')
    parser.add_argument('--steps', type=int, default=5, help='timed steps per round')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per model before the rounds')
    parser.add_argument('--mode', choices=('train', 'infer', 'both'), default='train')
    parser.add_argument('--precision', choices=('fp32', 'bf16'), default='fp32')
    parser.add_argument('--optimizer', choices=('sgd', 'adamw'), default='sgd')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch decides)')
    parser.add_argument('--channels-last', action='store_true', help='feed the input in channels-last memory format')
    parser.add_argument('--json', default=None, help='write the result rows to this JSON file')
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def make_step(
        model: nn.Module,
        mode: str,
        precision: str,
        optimizer_name: str,
        images: torch.Tensor,
        targets: torch.Tensor,
) -> Callable[[], None]:
    """A closure running one training or inference step of `model` on the fixed batch."""
    device = images.device
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == 'bf16' else nullcontext()
    )
    if mode == 'infer':
        model.eval()

        def infer_step() -> None:
            with torch.inference_mode(), autocast:
                model(images)

        return infer_step

    model.train()
    if optimizer_name == 'sgd':
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

    def train_step() -> None:
        with autocast:
            loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train_step


def images_per_second(step: Callable[[], None], steps: int, batch_size: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def benchmark(name: str, mode: str, args: argparse.Namespace) -> Dict[str, float]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False).to(device)
    ours = create_model(name).to(device)
    ours.load_state_dict(reference.state_dict(), strict=True)

    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, reference.num_classes, (args.batch_size,), device=device)
    steps = {
        'ours': make_step(ours, mode, args.precision, args.optimizer, images, targets),
        'reference': make_step(reference, mode, args.precision, args.optimizer, images, targets),
    }
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    synchronize(device)

    rates: Dict[str, List[float]] = {'ours': [], 'reference': []}
    for round_index in range(args.rounds):
        order = ('ours', 'reference') if round_index % 2 == 0 else ('reference', 'ours')
        for which in order:
            rates[which].append(images_per_second(steps[which], args.steps, args.batch_size, device))

    ratios = [o / r for o, r in zip(rates['ours'], rates['reference'])]
    return {
        'ours': statistics.median(rates['ours']),
        'reference': statistics.median(rates['reference']),
        'ratio': statistics.median(ratios),
        'ratio_min': min(ratios),
        'ratio_max': max(ratios),
    }


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device) -> str:
    if device.type == 'cuda':
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f'{cpu_name()}, {torch.get_num_threads()} threads'
    return (f'{hardware}; torch {torch.__version__}, timm {timm.__version__}; '
            f'{datetime.datetime.now().isoformat(timespec="minutes")}')


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = ('train', 'infer') if args.mode == 'both' else (args.mode,)
    print(f'# {machine_description(torch.device(args.device))}')
    print(f'# batch {args.batch_size}, {args.image_size}x{args.image_size}, {args.precision}, '
          f'{args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up steps, optimizer {args.optimizer}')

    header = f"{'variant':<24} {'mode':<6} {'ours img/s':>11} {'timm img/s':>11} {'ours/timm':>10} {'(min-max)':>13}"
    print(header)
    print('-' * len(header))
    rows = []
    for name in args.models:
        for mode in modes:
            result = benchmark(name, mode, args)
            print(f"{name:<24} {mode:<6} {result['ours']:>11.2f} {result['reference']:>11.2f} "
                  f"{result['ratio']:>10.3f} {result['ratio_min']:>6.3f}-{result['ratio_max']:.3f}", flush=True)
            rows.append({
                'name': f'model/{name}/{mode}/{args.precision}',
                'ours': round(result['ours'], 3),
                'reference': round(result['reference'], 3),
                'ratio': round(result['ratio'], 4),
                'unit': 'img/s',
            })

    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)
            f.write('\n')


if __name__ == '__main__':
    main()
