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
from nrrdd.config import StudentConfig, SynthConfig, images_per_class, recipe_name, to_dict
from nrrdd.data import Split, dataset_stats, load_dataset, load_distilled
from nrrdd.files import read_json, sha256_bytes, sha256_file, write_json
from nrrdd.models import create_model
from nrrdd.outdir import check_out, finish_out, open_out
from nrrdd.refine import to_uint8
from nrrdd.relabel import (PlanSpec, StoredLabels, images_digest, label_accounting, label_mode, load_labels, make_plan,
                           mixed_batch, sample_bytes, store_labels, student_loss, student_set)
from nrrdd.runtime import barrier, init_from_env, is_main, mine, pick_device, provenance, rank, world
from nrrdd.selection import check_enough_images, initial_images
from nrrdd.training import TrainState, accuracy, check_finite, cosine, ema_copy, ema_update, param_groups


# ---------------------------------------------------------------- one student

def train_student(images, labels, num_classes, spec: PlanSpec, cfg: StudentConfig, seed: int, device,
                  stats, teacher=None, payload=None, state_path=None, progress=True, ddp=False, name="student"):
    """Train one student from scratch on the plan, normalising its inputs with `stats` (mean, std); returns the
    model after the final epoch (with `cfg.ema`, the moving average of its weights instead) and the seconds it
    trained, those of the runs it resumed included. With `ddp` (inside a torchrun process group) every rank
    trains the same model on its rows of each batch."""
    plan = {k: v.to(device) for k, v in make_plan(spec).items()}
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
    state, start = TrainState(state_path), 0
    if state.exists():
        counters = state.load(model, opt, gen)
        start = counters["epoch"]
        if ema is not None:
            ema.load_state_dict(counters["ema"])
    saves = state.path is not None and (is_main() or not ddp)
    nb = math.ceil(spec.num_images / spec.batch_size)
    net.train()
    for epoch in tqdm(range(start, spec.epochs), desc=f"{name} seed {seed}", disable=not progress, leave=False,
                      initial=start, total=spec.epochs):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * cosine(epoch, spec.epochs, cfg.cosine_span)
        for b in range(nb):
            x, y_org, y_aug, lam = (t[rows] for t in mixed_batch(images, labels, plan, spec, epoch, b, model.mean,
                                                                 model.std))
            if mode.teacher_online:
                with torch.no_grad():
                    label = {"logits": teacher(x)}
            elif payload is not None:
                batch = slice(b * spec.batch_size, (b + 1) * spec.batch_size)
                label = {k: v[rows] for k, v in payload.batch(epoch, batch, device).items()}
            else:  # hard labels: the plan's classes are all there is
                label = {}
            loss = student_loss(cfg.label_mode, net(x), y_org, y_aug, lam, label, cfg, num_classes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema_update(ema, model, cfg.ema)
        if saves and ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == spec.epochs):
            check_finite(loss, f"student seed {seed} epoch {epoch + 1}")
            state.save(model, opt, gen, epoch=epoch + 1, **({"ema": ema.state_dict()} if ema is not None else {}))
    return (model if ema is None else ema), round(state.elapsed(), 1)


# ---------------------------------------------------------------- evaluate: several seeds, one results file

def recipe(settings: dict) -> dict:
    """What makes two runs' per-seed results interchangeable: all but which seeds run and how often to save
    (checkpoints, label shards)."""
    return {k: v for k, v in settings.items() if k not in ("seeds", "first_seed", "checkpoint_every", "shard_mb")}


def random_baseline(ds, teacher, record: dict, ipc: int, device) -> Split:
    """The random preset's images beside a distilled set: ipc x beta real training images per class, drawn from
    the set's synthesis seed and stitched as it was, so IOR compares storage for storage."""
    cfg = SynthConfig(init="random", refine="none", ipc=ipc, beta=(record.get("config") or {}).get("beta", 1),
                      seed=record.get("seed", 0))
    check_enough_images(torch.bincount(ds.train.labels, minlength=ds.num_classes).tolist(), ds.classes, cfg)
    x, y, _ = initial_images(teacher, ds.train, ds.num_classes, cfg, device, progress=False)
    return Split(to_uint8(x, teacher.mean, teacher.std).cpu(), y)


def labels_for(label_dir: Path, make: bool, teacher, images, labels, spec: PlanSpec, cfg: StudentConfig,
               progress: bool) -> tuple[StoredLabels | None, dict]:
    """The stored labels a student reads (None for online or hard labels), relabelled here once when `make`
    and not yet complete (the plan file comes last); a resumed run keeps the shards already written."""
    if not label_mode(cfg.label_mode).store:
        return None, {}
    plan_file = label_dir / "plan.safetensors"
    if make and not plan_file.exists():
        label_dir.mkdir(parents=True, exist_ok=True)
        store_labels(label_dir, teacher, images, labels, spec, cfg, progress)
    barrier()
    stored, _ = load_labels(label_dir, cfg.label_mode, spec, images)
    num_classes = int(labels.max()) + 1
    return stored, label_accounting(label_dir, cfg.label_mode, plan_file.stat().st_size, spec, num_classes,
                                    sample_bytes(cfg.label_mode, num_classes, cfg))


def train_seeds(folder: Path, name: str, images, labels, spec: PlanSpec, cfg: StudentConfig, seeds: list[int],
                device, stats, teacher, payload, ds, progress: bool) -> list[dict]:
    """One student per seed, each result in folder/seed_<n>.json as soon as it is trained (a killed run resumes
    from the last checkpoint of the seed it was in). Returns the per-seed results on rank 0."""
    ddp = cfg.ddp and world() > 1
    for seed in seeds if ddp else mine(seeds):  # without DDP each rank trains whole seeds
        seed_file, state_file = folder / f"seed_{seed}.json", folder / f".state_{seed}.pt"
        if seed_file.exists():
            if is_main() or not ddp:
                state_file.unlink(missing_ok=True)  # killed between the two writes
            continue
        model, seconds = train_student(images, labels, ds.num_classes, spec, cfg, seed, device, stats, teacher, payload,
                              state_path=state_file, progress=progress, ddp=ddp, name=name)
        if ddp and not is_main():
            continue
        r = {"seed": seed, "val_acc": accuracy(model, ds.val, device), "test_acc": accuracy(model, ds.test, device),
             "time_s": seconds,
             "weights_sha256": sha256_bytes(b"".join(v.detach().cpu().contiguous().numpy().tobytes()
                                                     for v in model.state_dict().values()))}
        write_json(seed_file, r)
        state_file.unlink(missing_ok=True)
    barrier()
    return [read_json(folder / f"seed_{seed}.json") for seed in seeds] if is_main() else []


def seed_stats(per_seed: list[dict]) -> dict:
    out = {}
    for split in ("test", "val"):
        v = [r[f"{split}_acc"] for r in per_seed]
        out[f"{split}_mean"] = round(statistics.mean(v), 2)
        out[f"{split}_std"] = round(statistics.stdev(v), 2) if len(v) > 1 else 0.0
    return out


def join_seeds(records: list[dict]) -> dict:
    """One evaluation record of the same students from records of disjoint seeds (parts trained in parallel, a
    confirmation's seeds beside a screen's): per-seed results joined, statistics and the random baseline's
    recomputed, wall times summed (the students' cost, not the elapsed time when parts ran side by side); the rest
    is the first record's."""
    def joined(parts: list[dict]) -> dict:
        per_seed = sorted((p for r in parts for p in r["per_seed"]), key=lambda p: p["seed"])
        seeds = [p["seed"] for p in per_seed]
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"records to join share seeds: {seeds}")
        return {**parts[0], "per_seed": per_seed, "seeds": seeds, **seed_stats(per_seed)}
    out = joined(records)
    out["config"] = {**out["config"], "first_seed": out["seeds"][0], "seeds": len(out["seeds"])}
    out["wall_time_s"] = round(sum(r["wall_time_s"] for r in records), 1)
    if all(r.get("baseline") for r in records):
        out["baseline"] = joined([r["baseline"] for r in records])
        out["ior"] = {k: round(out[f"{k}_mean"] - out["baseline"][f"{k}_mean"], 2) for k in ("test", "val")}
    return out


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
    # at the distilled size; a test split too large to hold decoded is listed and decoded batch by batch
    ds = data or load_dataset(spec_name, split.images.shape[-1], progress=progress, lazy="auto")
    if classes != ds.classes:
        raise NrrddError(f"{distilled}: distilled classes {classes} do not match the test set's {ds.classes}")
    teacher, meta = (load_model(teacher_path, classes=ds.classes, device=dev) if teacher_path else (None, {}))
    stats = (teacher.mean, teacher.std) if teacher is not None else dataset_stats(ds)
    ipc = images_per_class(len(split), len(classes), record.get("ipc"))
    images, labels, spec = student_set(split, len(classes), record, cfg)
    mode = label_mode(cfg.label_mode)
    if teacher is None and cfg.baseline != "none":  # its random images are labelled by the teacher too
        raise NrrddError(f"label mode {cfg.label_mode} with --baseline random needs a teacher: pass --teacher")
    if teacher is None and (mode.teacher_online or (mode.store and not labels_dir)):
        raise NrrddError(f"label mode {cfg.label_mode} needs a teacher: pass --teacher"
                         + (" (or --labels from nrrdd relabel)" if mode.store else ""))
    if labels_dir is not None and mode.store:
        load_labels(labels_dir, cfg.label_mode, spec, images)  # refused labels never open --out
    base = random_baseline(ds, teacher, record, ipc, dev) if cfg.baseline == "random" else None
    barrier()  # every rank has checked --out before rank 0 opens it
    if is_main():
        open_out(out, "evaluate", settings, state)
    barrier()

    payload, labels_info = labels_for(Path(labels_dir or out), labels_dir is None, teacher, images, labels, spec, cfg,
                                      progress)
    per_seed = train_seeds(out / "seeds", "student", images.to(dev), labels.to(dev), spec, cfg, seeds, dev, stats,
                           teacher, payload, ds, progress)
    baseline = None
    if base is not None:
        b_images, b_labels, b_spec = student_set(base, len(classes), record, cfg)
        b_payload, _ = labels_for(out / "baseline", True, teacher, b_images, b_labels, b_spec, cfg, progress)
        b_seeds = train_seeds(out / "baseline" / "seeds", "random", b_images.to(dev), b_labels.to(dev), b_spec, cfg,
                              seeds, dev, stats, teacher, b_payload, ds, progress)
        baseline = b_seeds and {"kind": "random", "images_sha256": images_digest(base.images), "seeds": seeds,
                                "per_seed": b_seeds, **seed_stats(b_seeds)}
    if not is_main():
        return {}
    results = {"kind": "evaluation", "distilled": str(distilled), "preset": record.get("preset"), "ipc": ipc,
               "data": spec_name, "teacher": str(teacher_path) if teacher_path else None,
               "teacher_arch": meta.get("arch"), "teacher_test_acc": meta.get("test_acc"),
               "recipe": recipe_name(to_dict(cfg)), "config": to_dict(cfg),
               "plan": asdict(spec), "inputs": inputs, "seeds": [r["seed"] for r in per_seed], "per_seed": per_seed,
               **seed_stats(per_seed), "labels": labels_info, "distilled_config": record.get("config"),
               "distill_timings": record.get("timings"),  # so one record says what the whole result cost
               "processes": world(), "wall_time_s": round(time.time() - t0, 1), **provenance()}
    if baseline:
        results |= {"baseline": baseline, "ior": {k: round(results[f"{k}_mean"] - baseline[f"{k}_mean"], 2)
                                                  for k in ("test", "val")}}
    write_json(out / "results.json", results)
    finish_out(out, "evaluate", settings, {"kind": "evaluation"})
    return results
