r"""The PyTorch peer of `bench/train_throughput.py`: timm's ViT train step, timed on request.

Runs under the peer venv (`.venv-bench`, bench/requirements-peer.txt) and
imports nothing of stockpot or JAX, so it parses its arguments with argparse
(absl is not in that venv). It builds timm's `VisionTransformer` with the
shape it is given, configured as stockpot's ViT (no class token, final norm
then mean pooling, tanh GELU, biased q/k/v, no dropout, float32), and the step
a timm user writes for what stockpot's step does: softmax cross-entropy
against one-hot targets, backward, clip by global norm, SGD with momentum,
two weight EMAs (timm's `ModelEmaV3`). `--compile` wraps the model in
`torch.compile` (the optimizer and EMAs stay eager, as in timm's train.py).

After building and warming up it prints one JSON line (parameter count, the
step's FLOPs by `torch.utils.flop_counter`, warm-up seconds), then answers
each stdin line with one JSON line, so the caller can interleave it with
its own measurements:
  steps N    {"seconds": wall time of N steps, "loss": last loss}
  matmul N   {"flops_per_s": float32 FLOP/s of an N x N x N matmul}
"""

import argparse
import json
import sys
import time

import timm
from timm.models.vision_transformer import VisionTransformer
from timm.utils import ModelEmaV3
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for name in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "image_size", "channels",
               "num_classes", "batch_size"):
    parser.add_argument(f"--{name}", type=int, required=True)
  parser.add_argument("--lr", type=float, required=True)
  parser.add_argument("--momentum", type=float, required=True)
  parser.add_argument("--clip_norm", type=float, required=True)
  parser.add_argument("--ema_decays", type=float, nargs="*", required=True)
  parser.add_argument("--warmup_steps", type=int, default=3)
  parser.add_argument("--compile", action="store_true", help="torch.compile the model.")
  return parser.parse_args()


def build_model(args):
  """timm's ViT in stockpot's configuration (see the module docstring)."""
  return VisionTransformer(
      img_size=args.image_size, patch_size=args.patch_size, in_chans=args.channels,
      num_classes=args.num_classes, global_pool="avg", class_token=False, fc_norm=False,
      embed_dim=args.width, depth=args.depth, num_heads=args.num_heads,
      mlp_ratio=args.mlp_dim / args.width, qkv_bias=True, act_layer="gelu_tanh",
      drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)


def make_step(args, model):
  """Returns `step()`: one optimizer step on a fixed random batch; returns the loss tensor."""
  generator = torch.Generator().manual_seed(0)
  images = torch.rand(args.batch_size, args.channels, args.image_size, args.image_size,
                      generator=generator) * 2 - 1
  labels = F.one_hot(torch.randint(0, args.num_classes, (args.batch_size,), generator=generator),
                     args.num_classes).float()
  forward = torch.compile(model) if args.compile else model
  sgd = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
  emas = [ModelEmaV3(model, decay=decay) for decay in args.ema_decays]

  def step():
    loss = F.cross_entropy(forward(images), labels)
    sgd.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_norm)
    sgd.step()
    for ema in emas:
      ema.update(model)
    return loss

  return step, images, labels


def step_flops(model, images, labels):
  """FLOPs of forward + backward as torch's FlopCounterMode counts them (matmuls and convs)."""
  with FlopCounterMode(display=False) as counter:
    F.cross_entropy(model(images), labels).backward()
  model.zero_grad(set_to_none=True)
  return counter.get_total_flops()


def matmul_flops_per_s(n, repeats=5):
  """Float32 FLOP/s of torch.mm on two n x n matrices, the best of `repeats`."""
  a, b = torch.randn(n, n), torch.randn(n, n)
  torch.mm(a, b)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    torch.mm(a, b)
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def main():
  args = _parse_args()
  torch.manual_seed(0)
  model = build_model(args).train()
  step, images, labels = make_step(args, model)
  flops = step_flops(model, images, labels)
  start = time.perf_counter()
  for _ in range(args.warmup_steps):
    step()
  ready = {"params": sum(p.numel() for p in model.parameters()), "flop_counter_flops": flops,
           "warmup_s": time.perf_counter() - start, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "timm": timm.__version__}
  print(json.dumps(ready), flush=True)
  for line in sys.stdin:
    command, count = line.split()
    if command == "steps":
      start = time.perf_counter()
      for _ in range(int(count)):
        loss = step()
      reply = {"seconds": time.perf_counter() - start, "loss": loss.item()}
    elif command == "matmul":
      reply = {"flops_per_s": matmul_flops_per_s(int(count))}
    else:
      raise ValueError(f"unknown command {line!r}; known: steps N, matmul N")
    print(json.dumps(reply), flush=True)


if __name__ == "__main__":
  main()
