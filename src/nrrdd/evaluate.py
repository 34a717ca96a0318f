"""Students trained from scratch on a distilled set, with any label mode; results as JSON."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from nrrdd import NrrddError
from nrrdd.checkpoint import load_model
from nrrdd.config import StudentConfig, images_per_class, to_dict
from nrrdd.data import load_dataset, load_distilled
from nrrdd.files import read_json, sha256_bytes, sha256_file, write_json
from nrrdd.models import create_model
from nrrdd.outdir import check_out, finish_out, open_out
from nrrdd.relabel import (PlanSpec, images_digest, label_accounting, label_mode, label_slice, load_labels, make_plan,
                           mixed_batch, store_labels, student_loss, student_set)
from nrrdd.runtime import barrier, init_from_env, is_main, mine, pick_device, provenance, rank, world
from nrrdd.training import TrainState, accuracy, check_finite, cosine, ema_copy, ema_update, param_groups


# ---------------------------------------------------------------- one student

def train_student(images, labels, num_classes, spec: PlanSpec, cfg: StudentConfig, seed: int, device,
                  stats, teacher=None, payload=None, state_path=None, progress=True, ddp=False):
    """Train one student from scratch on the plan, normalising its inputs with `stats` (mean, std); returns the
    model after the final epoch (with `cfg.ema`,
    the moving average of its weights instead). With `ddp` (inside a torchrun process group) every rank trains the same model on its rows of each batch."""
    plan = {k: v.to(device) for k, v in make_plan(spec).items()}
    payload = {k: v.to(device) for k, v in (payload or {}).items()}
    mode = label_mode(cfg.label_mode)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_model(cfg.student, num_classes, images.shape[-1], images.shape[1], **cfg.model_kwargs())
    model = model.set_stats(*stats).to(device)
    net, rows = model, slice(None)
    if ddp:
        if spec.batch_size < world():
            raise NrrddError(f"--ddp: batch size {spec.batch_size} leaves some of the {world()} ranks no images")
        if device.type == "cuda":  # per-rank BatchNorm statistics over a few images each would change the recipe
            model = net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
        rows = slice(rank(), None, world())  # DDP averages the ranks' gradients: the whole batch's mean loss
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    ema = ema_copy(model) if cfg.ema else None
    state, start = (TrainState(state_path) if state_path else None), 0
    if state is not None and state.exists():
        counters = state.load(model, opt, gen)
        start = counters["epoch"]
        if ema is not None:
            ema.load_state_dict(counters["ema"])
    saves = state is not None and (is_main() or not ddp)
    nb = math.ceil(spec.num_images / spec.batch_size)
    net.train()
    for epoch in tqdm(range(start, spec.epochs), desc=f"student seed {seed}", disable=not progress, leave=False,
                      initial=start, total=spec.epochs):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * cosine(epoch, spec.epochs, cfg.cosine_span)
        for b in range(nb):
            x, y_org, y_aug, lam = (t[rows] for t in mixed_batch(images, labels, plan, spec, epoch, b, model.mean, model.std))
            if mode.teacher_online:
                with torch.no_grad():
                    label = {"logits": teacher(x)}
            else:
                label = {k: v[rows] for k, v in label_slice(payload, spec, epoch, b, device).items()}
            loss = student_loss(cfg.label_mode, net(x), y_org, y_aug, lam, label, cfg, num_classes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema_update(ema, model, cfg.ema)
        if saves and ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == spec.epochs):
            check_finite(loss, f"student seed {seed} epoch {epoch + 1}")
            state.save(model, opt, gen, epoch=epoch + 1, **({"ema": ema.state_dict()} if ema is not None else {}))
    return model if ema is None else ema


# ---------------------------------------------------------------- evaluate: several seeds, one results file

def recipe(settings: dict) -> dict:
    """What makes two runs' per-seed results interchangeable: all but which seeds run and how often to save."""
    return {k: v for k, v in settings.items() if k not in ("seeds", "first_seed", "checkpoint_every")}


def evaluate(distilled, cfg: StudentConfig, out_dir, teacher_path=None, labels_dir=None, device="auto",
             resume=False, overwrite=False, progress=True, data=None, verify: bool = True) -> dict:
    out = Path(out_dir)
    split, classes, record = load_distilled(distilled, verify)
    teacher_path = teacher_path or record.get("teacher", {}).get("path")
    # a resumed run may reuse per-seed results only if they come from the same recipe, images and teacher
    inputs = {"images_sha256": images_digest(split.images),
              "teacher_sha256": sha256_file(teacher_path) if teacher_path and Path(teacher_path).is_file() else None}
    settings = {"config": recipe(to_dict(cfg)), "inputs": inputs}
    state = check_out(out, "evaluate", settings, overwrite, resume, inputs=[distilled, teacher_path, labels_dir])
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    if state == "finished":
        results = read_json(out / "results.json")
        if results["seeds"] == seeds:
            return results
        # other seeds of the same recipe: train the missing ones, reuse the others' files
    t0 = time.time()
    dev = pick_device(device)
    init_from_env(dev)
    progress = progress and is_main()
    spec_name = cfg.data or record.get("data", {}).get("spec")
    if not spec_name:
        raise NrrddError(f"{distilled}: no distill.json names the data set; pass --data for the test split")
    ds = data or load_dataset(spec_name, progress=progress)
    if classes != ds.classes:
        raise NrrddError(f"{distilled}: distilled classes {classes} do not match the test set's {ds.classes}")
    teacher, meta = (load_model(teacher_path, classes=ds.classes, device=dev) if teacher_path else (None, {}))
    stats = (teacher.mean, teacher.std) if teacher is not None else (ds.mean, ds.std)
    images, labels, spec = student_set(split, len(classes), record, cfg)
    images, labels = images.to(dev), labels.to(dev)
    mode = label_mode(cfg.label_mode)
    if teacher is None and (mode.teacher_online or (mode.store and not labels_dir)):
        raise NrrddError(f"label mode {cfg.label_mode} needs a teacher: pass --teacher"
                         + (" (or --labels from nrrdd relabel)" if mode.store else ""))
    if labels_dir is not None and mode.store:
        load_labels(labels_dir, cfg.label_mode, spec, images)  # refused labels never open --out
    barrier()  # every rank has checked --out before rank 0 opens it
    if is_main():
        open_out(out, "evaluate", settings, state)
    barrier()

    payload, labels_info = None, {}
    if mode.store:
        label_file = Path(labels_dir or out) / f"labels_{cfg.label_mode}.safetensors"
        if labels_dir is None and not label_file.exists():  # relabel here once; a resumed run reuses the file
            store_labels(out, teacher, images, labels, spec, cfg, progress)
        barrier()
        payload, _ = load_labels(label_file.parent, cfg.label_mode, spec, images)
        labels_info = label_accounting(label_file, (label_file.parent / "plan.safetensors").stat().st_size, payload,
                                       spec, len(classes))

    ddp = cfg.ddp and world() > 1
    for seed in seeds if ddp else mine(seeds):  # without DDP each rank trains whole seeds
        seed_file, state_file = out / "seeds" / f"seed_{seed}.json", out / "seeds" / f".state_{seed}.pt"
        if seed_file.exists():
            if is_main() or not ddp:
                state_file.unlink(missing_ok=True)  # killed between the two writes
            continue
        ts = time.time()
        model = train_student(images, labels, len(classes), spec, cfg, seed, dev, stats, teacher, payload,
                              state_path=state_file, progress=progress, ddp=ddp)
        if ddp and not is_main():
            continue
        r = {"seed": seed, "val_acc": accuracy(model, ds.val, dev), "test_acc": accuracy(model, ds.test, dev), "time_s": round(time.time() - ts, 1),
             "weights_sha256": sha256_bytes(b"".join(v.detach().cpu().contiguous().numpy().tobytes()
                                                     for v in model.state_dict().values()))}
        write_json(seed_file, r)
        state_file.unlink(missing_ok=True)
    barrier()
    if not is_main():
        return {}
    per_seed = [read_json(out / "seeds" / f"seed_{seed}.json") for seed in seeds]

    def stats(key):
        v = [r[key] for r in per_seed]
        return round(statistics.mean(v), 2), round(statistics.stdev(v), 2) if len(v) > 1 else 0.0

    (test_mean, test_std), (val_mean, val_std) = stats("test_acc"), stats("val_acc")
    ipc = images_per_class(len(split), len(classes), record.get("ipc"))
    results = {"kind": "evaluation", "distilled": str(distilled), "preset": record.get("preset"), "ipc": ipc,
               "data": spec_name, "teacher": str(teacher_path) if teacher_path else None,
               "teacher_arch": meta.get("arch"), "config": to_dict(cfg), "plan": asdict(spec),
               "inputs": inputs, "seeds": [r["seed"] for r in per_seed], "per_seed": per_seed, "test_mean": test_mean,
               "test_std": test_std, "val_mean": val_mean, "val_std": val_std, "labels": labels_info,
               "distilled_config": record.get("config"), "processes": world(),
               "wall_time_s": round(time.time() - t0, 1), **provenance()}
    write_json(out / "results.json", results)
    finish_out(out, "evaluate", settings, {"kind": "evaluation"})
    return results
