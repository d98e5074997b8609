"""The bundle on disk: layout, manifest schema, integrity checks and atomic writes.

A bundle is untrusted input: the manifest is validated against the JSON Schema shipped with the
package, every path it names must stay inside the bundle, and every file's sha256 and size must
match. Writes go to a temporary sibling folder renamed into place, so an interrupted export never
leaves a half bundle that looks whole, and a failed one never touches the bundle already there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import uuid
from dataclasses import dataclass
from importlib import resources

import jsonschema

from .errors import StitchError, command, exact_int

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
UNHASHED_DIRS = ("lut/",)  # added after export, per device; validated by their own readers


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _schema() -> dict:
    return json.loads(resources.files("stitch_compile").joinpath("manifest.schema.json").read_text())


def inside(root: str, rel: str) -> str:
    """Absolute path of ``rel`` under ``root``; refuse any path that leaves the bundle."""
    if os.path.isabs(rel) or "\\" in rel:
        raise StitchError(f"{root}: manifest path {rel!r} is not a relative bundle path; the bundle is tampered")
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([real_root, path]) != real_root:
        raise StitchError(f"{root}: manifest path {rel!r} leaves the bundle; the bundle is tampered")
    return path


@dataclass
class Bundle:
    """A validated bundle folder and its manifest."""

    root: str
    manifest: dict

    @property
    def configs(self) -> dict[int, dict]:
        return {c["id"]: c for c in self.manifest["configs"]}

    def config(self, config_id) -> dict:
        """The manifest entry of an integer id (Python or numpy); a float, bool or string is an
        unknown id, not rounded or parsed into one."""
        entry = self.configs.get(exact_int(config_id))
        if entry is None:
            ids = sorted(self.configs)
            raise StitchError(f"{self.root}: unknown config id {config_id!r}; this bundle has {len(ids)} configs, ids {ids[0]}..{ids[-1]}")
        return entry

    def path(self, rel: str) -> str:
        return inside(self.root, rel)

    def graph(self, target: str, config_id: int) -> str:
        targets = self.manifest["targets"]
        if target not in targets:
            raise StitchError(f"{self.root}: no {target!r} target in this bundle (has {', '.join(targets)}); re-export with --targets {target}")
        self.config(config_id)
        return self.path(targets[target]["graphs"][str(config_id)])

    def check_route(self, config_id: int, io) -> None:
        """Refuse a route whose segments do not fit one another (a tampered manifest); ``io(key)``
        gives the segment graph's (input shape, output shape), batch first. What shape inference
        could not tell fits anything: a dimension that is not an int, a shape of unknown rank (``[]``)."""
        def fits(a: list, b: list) -> bool:
            return len(a) == len(b) and all(x == y or not (type(x) is type(y) is int) for x, y in zip(a, b))

        def dims(shape) -> str:
            return ", ".join("?" if type(d) is not int else str(d) for d in shape)

        gives = self.manifest["input"]["shape"][1:]
        for key in [*self.config(config_id)["route"], None]:
            takes, out = (self.manifest["output"]["shape"], None) if key is None else io(key)
            if gives is not None and takes and not fits(gives, takes[1:]):
                where = "the output" if key is None else f"segment {key!r}"
                raise StitchError(f"{self.root}: config {config_id}: {where} takes [batch, {dims(takes[1:])}] but "
                                  f"gets [batch, {dims(gives)}]; the bundle is tampered")
            gives = out[1:] if out else None

    def holds(self, path: str) -> bool:
        """Whether ``path`` is one of the bundle's own files: its manifest, a listed file or a LUT."""
        rel = os.path.relpath(os.path.realpath(path), os.path.realpath(self.root)).replace(os.sep, "/")
        return rel == MANIFEST or rel in self.manifest["files"] or rel.startswith(UNHASHED_DIRS)

    def lut_path(self, device_key: str) -> str:
        return self.path(f"lut/{device_key}.json")


def load_bundle(root: str, check_hashes: bool = False) -> Bundle:
    """Read and validate ``root``; ``check_hashes`` re-hashes every file (``verify`` does)."""
    manifest_path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise StitchError(f"{root}: no such bundle folder; create one with `{command('export', 'CHECKPOINT', '--out', root)}`")
    if not os.path.isfile(manifest_path):
        raise StitchError(f"{root}: not a bundle (no {MANIFEST}); create one with `{command('export')}`")
    try:
        manifest = read_json(manifest_path)
    except ValueError as exc:  # bad JSON or encoding
        raise StitchError(f"{manifest_path}: corrupt manifest ({exc}); re-export the bundle") from None
    if isinstance(manifest, dict) and manifest.get("schema_version") not in (None, SCHEMA_VERSION):
        raise StitchError(f"{manifest_path}: schema_version {manifest.get('schema_version')!r} is not supported "
                          f"by this stitch-compile (reads {SCHEMA_VERSION}); re-export with this version")
    try:
        jsonschema.validate(manifest, _schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(map(str, exc.absolute_path)) or "(top)"
        raise StitchError(f"{manifest_path}: invalid manifest at {where}: {exc.message}") from None
    bundle = Bundle(root, manifest)
    _check_configs(manifest, manifest_path)
    referenced = set(manifest["files"])
    for name, target in manifest["targets"].items():
        if name == "aoti":
            for build in target["builds"].values():
                referenced.update([build["constants"], *build["weights"], *build["packages"].values()])
        else:
            referenced.update([*target["graphs"].values(), *target.get("weights", [])])
    referenced.update(seg["file"] for seg in manifest["segments"].values())
    for rel in sorted(referenced):
        path = bundle.path(rel)
        if rel not in manifest["files"]:
            raise StitchError(f"{root}: {rel} is used but not listed in the manifest's files; the bundle is tampered")
        if not os.path.isfile(path):
            raise StitchError(f"{root}: missing file {rel}; the bundle is incomplete, re-export it")
        if os.path.getsize(path) != manifest["files"][rel]["bytes"]:
            raise StitchError(f"{root}: {rel} has {os.path.getsize(path)} bytes, the manifest says "
                              f"{manifest['files'][rel]['bytes']}; the bundle is tampered or truncated")
    if check_hashes:
        for rel, meta in sorted(manifest["files"].items()):
            if sha256_file(bundle.path(rel)) != meta["sha256"]:
                raise StitchError(f"{root}: {rel} does not match its sha256 in the manifest; the bundle is tampered or corrupt")
    return bundle


def same_export(bundle: Bundle, command: str, graphs: bool) -> Bundle:
    """The bundle now at ``bundle.root``, refused if a re-export since ``bundle`` was read changed
    what ``command`` measured: the checkpoint for top-1 accuracy; with ``graphs``, for latency,
    also the compiled graphs (tool, opset, configs) and the targets a runtime picks from."""
    def measured(manifest: dict) -> list:
        what = [manifest.get("source")]
        if graphs or not (manifest.get("source") or {}).get("sha256"):  # no checkpoint hash to go by
            what.append(manifest.get("reuse_key"))
        return what + [sorted(manifest.get("targets", {}))] if graphs else what
    try:
        current = load_bundle(bundle.root)
    except StitchError:
        current = None
    if current is None or measured(current.manifest) != measured(bundle.manifest):
        raise StitchError(f"{bundle.root}: the bundle was exported again while {command} ran, so what it measured "
                          f"would not describe it; run {command} again")
    return current


def _check_configs(manifest: dict, manifest_path: str) -> None:
    """What the schema cannot say: config ids are unique and routes name listed segments."""
    seen = set()
    for config in manifest["configs"]:
        if config["id"] in seen:
            raise StitchError(f"{manifest_path}: config id {config['id']} appears twice; the bundle is tampered")
        seen.add(config["id"])
        unknown = [key for key in config["route"] if key not in manifest["segments"]]
        if unknown:
            raise StitchError(f"{manifest_path}: config {config['id']}'s route names segment {unknown[0]!r}, which "
                              "the manifest does not list; the bundle is tampered")


def list_files(root: str) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} for every file but the manifest and LUTs."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            if rel == MANIFEST or rel.startswith(UNHASHED_DIRS):
                continue
            path = os.path.join(root, rel)
            files[rel] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
    return dict(sorted(files.items()))


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: str):
    """Parse a JSON file, refusing the NaN and Infinity that Python's json accepts: no file of a
    bundle has them, and a NaN compares false with everything, so it would slip past range checks.
    Every failure to parse is a ValueError, deep nesting included."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f, parse_constant=_refuse_constant)
        except RecursionError:
            raise ValueError("nested too deeply") from None


_LEFTOVER = re.compile(r"\.(?P<target>.+)\.(?P<kind>tmp|partial|old)-(?P<pid>[1-9][0-9]{0,9})-[0-9a-f]{12}")


def _sibling(path: str, kind: str) -> str:
    """A temporary name beside ``path`` naming its writer's pid, so that what a killed writer left
    is recognised (and cleared) later: ``.<name>.<kind>-<pid>-<random>``."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process there; never guess
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no pid is that large
        return False
    except OSError:  # another user's process
        return True
    return True


def leftover(name: str) -> str | None:
    """The target of ``name`` if it is a temporary file or folder left by a writer that died
    (SIGKILL, power loss); None for anything else, a live writer's included."""
    m = _LEFTOVER.fullmatch(name)
    return m["target"] if m and not _alive(int(m["pid"])) else None


def clear_leftovers(folder: str, target: str) -> None:
    """Remove what dead writers of ``folder/target`` left there. A bundle moved aside for the final
    swap of an export that was killed between its two renames goes back in place first."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if leftover(name) != target:
                continue
            path, out = os.path.join(folder, name), os.path.join(folder, target)
            real_folder = os.path.isdir(path) and not os.path.islink(path)  # a link is removed, never followed
            with contextlib.suppress(OSError):
                moved = os.path.join(path, "bundle")
                if (name.startswith(f".{target}.old-") and real_folder and os.path.isdir(moved)
                        and not os.path.islink(moved) and not os.path.lexists(out)):
                    os.replace(moved, out)
                if real_folder:
                    shutil.rmtree(path)
                else:
                    os.unlink(path)


@contextlib.contextmanager
def held_signals():
    """Hold Ctrl-C and SIGTERM over steps that must not be split (the two renames that swap a
    bundle into place), then deliver them. Only the main thread receives signals in Python."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):  # one at a time: a signal between them restores the first
            previous[s] = signal.signal(s, lambda signum, _frame: caught.append(signum))
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in caught:
            signal.raise_signal(s)


@contextlib.contextmanager
def atomic_file(path: str, binary: bool = False):
    """Yield a new file beside ``path`` that replaces it once written: a failed or interrupted write
    never leaves a truncated file, nor destroys the one already there. A symlinked ``path`` keeps
    its link (the file it points to is replaced). Not mkstemp: its 0600 would outlive the rename."""
    path = os.path.realpath(path)
    clear_leftovers(*os.path.split(path))
    tmp = _sibling(path, "tmp")
    try:
        with open(tmp, "xb" if binary else "x", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # gone (renamed), or never created (a read-only folder)
            os.unlink(tmp)


def check_writable(path: str) -> None:
    """One error line now when ``path`` (its folder made if missing) could not be written: before
    a measurement of minutes, not after it."""
    folder = os.path.dirname(os.path.realpath(path))
    while not os.path.isdir(folder):
        if os.path.lexists(folder):
            raise StitchError(f"cannot write {path}: {folder} is not a folder")
        folder = os.path.dirname(folder)
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise StitchError(f"cannot write {path} ({e.strerror or e}); make {folder} a writable folder") from None


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path) as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def check_replaceable(out: str) -> None:
    """Export replaces ``out`` whole, so it must be new, empty, or an earlier bundle holding
    nothing but what its manifest lists (and its LUTs): never a folder of the user's files, nor
    one that merely has a file called manifest.json."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise StitchError(f"{out}: exists and is not a folder; choose an empty or new --out folder")
    entries = set(os.listdir(out))
    if not entries:
        return
    try:
        manifest = read_json(os.path.join(out, MANIFEST))
    except (OSError, ValueError):
        manifest = None
    tool = manifest.get("tool") if isinstance(manifest, dict) else None
    if not (isinstance(tool, dict) and tool.get("name") == "stitch-compile" and isinstance(manifest.get("files"), dict)):
        raise StitchError(f"{out}: exists and is not a bundle; choose an empty or new --out folder")
    own = {MANIFEST, *(d.rstrip("/") for d in UNHASHED_DIRS), *(rel.split("/")[0] for rel in manifest["files"])}
    foreign = sorted(e for e in entries - own if leftover(e) is None)  # a dead writer's temporaries go too
    if foreign:
        raise StitchError(f"{out}: holds {foreign[0]} ({len(foreign)} entries the bundle does not list); export "
                          "replaces the whole folder, so move them out or choose another --out")


def recover(out: str) -> str:
    """Clear what a killed export left beside the bundle folder ``out`` (putting back a bundle it
    had moved aside); return ``out`` resolved (a symlinked ``out`` means the folder it points to)."""
    out = os.path.realpath(out.rstrip("/\\"))
    if os.path.islink(out):  # realpath stops at a loop of links
        raise StitchError(f"{out}: a loop of symbolic links; choose a folder for --out")
    clear_leftovers(*os.path.split(out))
    return out


@contextlib.contextmanager
def staging(out: str):
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` in two renames (a
    symlinked ``out`` keeps its link: the folder it points to is replaced)."""
    out = recover(out)
    parent = os.path.dirname(out)
    check_replaceable(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = _sibling(out, "partial")
        os.mkdir(tmp)  # not mkdtemp: its 0700 would become the bundle's mode; this follows the umask
    except OSError as e:
        raise StitchError(f"{out}: cannot create a bundle folder there ({e.strerror or e})") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _sibling(out, "old") if os.path.exists(out) else None
    with held_signals():  # an interrupt between the renames (or in the rollback) would leave no bundle at out
        try:
            if old:
                os.mkdir(old)
                os.replace(out, os.path.join(old, "bundle"))
            os.replace(tmp, out)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            _roll_back(out, tmp, old, e)


def _roll_back(out: str, tmp: str, old: str | None, error: OSError):
    """After a failed swap: the earlier bundle back at ``out``, the new one gone, one error line."""
    shutil.rmtree(tmp, ignore_errors=True)
    moved = os.path.join(old, "bundle") if old else ""
    if os.path.isdir(moved) and not os.path.lexists(out):
        with contextlib.suppress(OSError):
            os.replace(moved, out)
    if os.path.isdir(moved):  # the put-back failed: the only copy stays for recover() to put back
        raise StitchError(f"{out}: cannot put the new bundle in place ({error.strerror or error}); the earlier "
                          f"bundle is in {moved}, and the next export puts it back")
    if old:
        shutil.rmtree(old, ignore_errors=True)
    raise StitchError(f"{out}: cannot put the new bundle in place ({error.strerror or error})")
