"""Output folders of runs. A command checks its --out with `check_out` after every other input and before it
writes anything, opens it with `open_out` and seals it with `finish_out`:

- a folder is only ever replaced (`--overwrite`) when it holds an nrrdd run and nothing else: it is moved
  aside atomically and deleted once the new run has begun there, never `.`, `/`, the home folder, an ancestor
  of the working folder or of an input;
- a run resumes (`--resume`) only in a folder that holds a run of the same command and settings;
- while a run is unfinished its folder holds RUN_FILE (command and settings); a finished one holds the
  manifest, which records them too."""
from __future__ import annotations

import fnmatch
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from nrrdd import NrrddError


MANIFEST = "manifest.json"
RUN_FILE = ".nrrdd-run.json"

# What each command writes, as fnmatch patterns of paths relative to --out (`*` crosses folders). A file
# matching none of them, nor the manifest's list, is the user's.
OWNED = {
    "train-teacher": ("state.pt", "teacher.safetensors", "results.json"),
    "distill": ("images/*", "pictures/*", ".work/*", "synthetic.safetensors", "selection.json", "config.json",
                "distill.json"),
    "evaluate": ("seeds/*", "baseline/*", "labels_*.safetensors", "plan.safetensors", "results.json"),
    "relabel": ("plan.safetensors", "labels_*.safetensors", "labels.json"),
    "export": ("images.pt", "labels.pt", "image_folder/*", "export.json"),
    "demo": ("teacher/*", "distilled_*/*", "eval_*/*", "report.md", "report.png"),
}
COMMON = (MANIFEST, RUN_FILE, "*.tmp")  # *.tmp: atomic_path's temporary files
# manifests written before they recorded the command
_LEGACY_KIND = {"teacher": "train-teacher", "distilled": "distill", "evaluation": "evaluate", "labels": "relabel"}


@dataclass
class Run:
    command: str
    settings: dict | None  # None: a manifest from before settings were recorded
    finished: bool
    files: tuple[str, ...] = ()  # the manifest's list


def read_run(out: Path) -> Run | None:
    """The run a folder holds, or None when nothing there says nrrdd wrote it."""
    import json
    for name, finished in ((MANIFEST, True), (RUN_FILE, False)):
        f = out / name
        if not f.is_file():
            continue
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict):
            continue
        command = rec.get("command") or _LEGACY_KIND.get(rec.get("kind"))
        if command in OWNED:
            return Run(command, rec.get("settings"), finished, tuple(rec.get("files", {})))
    return None


def foreign_files(out: Path, run: Run | None) -> list[str]:
    """Files under `out` that `run` did not write (all of them when no run is there)."""
    owned = OWNED[run.command] + COMMON if run else ()
    listed = set(run.files) if run else set()
    rel = (p.relative_to(out).as_posix() for p in sorted(out.rglob("*")) if p.is_file() or p.is_symlink())
    return [r for r in rel if r not in listed and not any(fnmatch.fnmatch(r, pat) or fnmatch.fnmatch(Path(r).name, pat)
                                                          for pat in owned)]


def _names(files: list[str], n: int = 5) -> str:
    return ", ".join(files[:n]) + (f" and {len(files) - n} more" if len(files) > n else "")


def differences(a, b, prefix: str = "") -> list[str]:
    """The dotted names of the settings in which two nested dicts differ."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [prefix.rstrip(".") or "settings"]
    return [d for k in sorted(set(a) | set(b), key=str) for d in differences(a.get(k), b.get(k), f"{prefix}{k}.")]


def _writable(out: Path) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NrrddError(f"--out {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise NrrddError(f"--out {out}: {probe} is not writable (read-only file system or no permission); "
                         "choose another --out")


def _refuse_to_replace(out: Path, inputs) -> None:
    real, cwd = out.resolve(), Path.cwd().resolve()
    if real == Path(real.anchor) or real == Path.home().resolve() or real == cwd or real in cwd.parents:
        raise NrrddError(f"--out {out}: refusing to replace {real} (the root, home or working folder, or one "
                         "above it); choose a sub-folder of its own for the run")
    for p in inputs:
        p = Path(str(p).split(".zip")[0] + ".zip" if ".zip" in str(p) else p).resolve()
        if real == p or real in p.parents:
            raise NrrddError(f"--out {out}: refusing to replace a folder that holds the input {p}")


def check_out_file(out, overwrite: bool, what: str, is_ours) -> None:
    """An output that is one file: refuse an existing one without --overwrite, and with it any file that
    `is_ours(path)` (which raises NrrddError) does not recognise as one nrrdd wrote."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise NrrddError(f"--out {out}: exists; pass --overwrite to replace it (only {what})")
    if out.exists():
        is_ours(out)


def check_out(out, command: str, settings: dict, overwrite: bool = False, resume: bool = False,
              inputs=()) -> str:
    """Decide what to do with --out, touching nothing: 'new' (absent or empty), 'resume' (an unfinished run of
    this command and settings), 'finished' (a finished one), or 'replace' (--overwrite of an nrrdd run)."""
    out = Path(out)
    _writable(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "new"
    if not out.is_dir():
        raise NrrddError(f"--out {out}: is a file, not a folder")
    run = read_run(out)
    if (resume or overwrite) and run is not None:
        foreign = foreign_files(out, run)
        if foreign:
            raise NrrddError(f"--out {out}: besides an nrrdd run it holds files nrrdd did not write "
                             f"({_names(foreign)}); nrrdd neither writes among nor deletes them: move them out or "
                             "choose another --out")
    if resume and run is not None and run.command == command and run.settings == settings:
        return "finished" if run.finished else "resume"
    if overwrite:
        _refuse_to_replace(out, inputs)
        if run is None:
            raise NrrddError(f"--out {out}: holds files nrrdd did not write and no nrrdd run "
                             f"({_names(foreign_files(out, None))}); --overwrite only replaces a folder nrrdd "
                             "wrote: choose another --out")
        return "replace"
    if resume:
        what = ("not an nrrdd run" if run is None else f"a run of `nrrdd {run.command}`" if run.command != command
                else "a run from an older nrrdd" if run.settings is None
                else f"a run with other settings (differing: {_names(differences(run.settings, settings))})")
        raise NrrddError(f"--out {out}: holds {what}, so --resume cannot continue it here; pass --overwrite to "
                         "replace an nrrdd run, or choose another --out")
    raise NrrddError(f"--out {out}: already holds files from another run: pass --resume to continue it, "
                     "--overwrite to replace it, or choose another --out")


def open_out(out, command: str, settings: dict, state: str) -> Path:
    """Make --out ready for writing as `check_out` decided; from here on the folder holds RUN_FILE."""
    from nrrdd.files import write_json
    out = Path(out)
    aside = None
    if state == "replace":
        aside = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.replace(out, aside)  # atomic: the old run is whole, either here or there
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a finished run reopened (more seeds) is unfinished again
    write_json(out / RUN_FILE, {"command": command, "settings": settings})
    if aside is not None:
        shutil.rmtree(aside)
    return out


def finish_out(out, command: str, settings: dict, extra: dict) -> dict:
    """Write the manifest (which marks the folder complete and records the run), then drop RUN_FILE."""
    from nrrdd.files import write_manifest
    manifest = write_manifest(out, {**extra, "command": command, "settings": settings})
    (Path(out) / RUN_FILE).unlink(missing_ok=True)
    return manifest
