"""``engine test RIG TESTS.yaml``: unit tests for a rig's stages, without NATS or processes.

In the manner of ``bento test``: a test names a pipeline (the only one by default) and,
optionally, some of its stages; feeds input frames through them in this process, the way
the rack would (each frame CBOR-encoded and decoded between stages, a batch that raises
retried frame by frame, the frames that still fail set aside as dead letters); and checks
the frames that come out, in order, and the sinks the fan-out sends each to. A test file::

    env: {WEBHOOK_TOKEN: test}          # ${VAR}s the rig needs, over the environment
    tests:
      - name: a decline goes to review
        pipeline: bridge                # default: the rig's only pipeline
        stages: [normalise]             # default: all of the pipeline's, in order
        input:
          - body: {amount_minor: 1250, rc: "05"}
            headers: {terminal: T1}     # also kind, src, ts (defaults: test, test, 0)
        output:                         # one entry per frame out, in order
          - body_has: {amount: 12.5}    # also body (equal), headers_has, kind
            sinks: [jetstream, review]  # where the fan-out sends it
            check: 'body.outcome == "declined"'   # CEL over the output frame (or a list)
        dead_letters: 0                 # frames the stages refused (default 0)

Output: a ``PASS``/``FAIL`` line per test, the first difference of each failed one with its
place (``output[0].body.amount: expected 12.5, got 12.25``), and a count. Nothing here
writes outside a temporary directory (the stages' ``data_dir``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import GearConfig, PipelineConfig, RigConfig, parse_config
from engine.fanout import RouteError, targets
from engine.frame import Frame, FrameError, decode, encode, uuid7
from engine.keytable import (
    CUSTOM,
    INTEGER,
    LIST,
    MAP,
    REQUIRED,
    SECTIONS,
    STRING,
    Key,
    Table,
)
from engine.schema import At, ConfigError
from engine.yamlfile import load_yaml
from gears.base import GearContext, Stage, gear_class

FRAME = Table("input frame", "One frame fed to the first stage.", (
    Key("body", CUSTOM, "The body (any YAML value).", type_text="any value"),
    Key("headers", MAP, "Headers.", items="value"),
    Key("kind", STRING, "Kind.", "test"),
    Key("src", STRING, "Source.", "test"),
    Key("ts", INTEGER, "Timestamp, ns since the epoch.", 0, minimum=0),
))

EXPECT = Table("expected frame", "Checks of one output frame (all given must hold).", (
    Key("body", CUSTOM, "The body, equal.", type_text="any value"),
    Key("body_has", MAP, "Paths and values the body holds (maps compared as subsets).",
        items="value"),
    Key("headers_has", MAP, "Headers the frame has, with these values.", items="value"),
    Key("kind", STRING, "Kind, equal."),
    Key("sinks", LIST, "The sinks the fan-out sends it to, in the pipeline's order.",
        items="sink name"),
    Key("check", CUSTOM, "CEL conditions over the output frame (``body``, ``headers``, "
        "``kind``, ``src``, ``ts``): each must be true.",
        type_text="a CEL expression or a list of them"),
))

CASE = Table("test", "One test.", (
    Key("name", STRING, "What it shows.", REQUIRED),
    Key("pipeline", STRING, "The pipeline; default: the rig's only one."),
    Key("stages", LIST, "Stages to run (in the pipeline's order); default: all.",
        items="stage name"),
    Key("input", SECTIONS, "Frames in.", REQUIRED, table=FRAME),
    Key("output", SECTIONS, "Frames expected out, in order (their count must match).",
        table=EXPECT),
    Key("dead_letters", INTEGER, "Frames the stages refuse.", 0, minimum=0),
))

TESTS_FILE = Table("tests file", "A file of rig tests (``engine test``).", (
    Key("env", MAP, "Values of ``${VAR}`` in the rig, over the environment.", items="text"),
    Key("tests", SECTIONS, "The tests.", REQUIRED, table=CASE),
))

_UNSET = object()


@dataclass(frozen=True, slots=True)
class Expect:
    """One expected output frame."""

    checks: Mapping[str, Any]
    at: At


@dataclass(frozen=True, slots=True)
class Case:
    """One test, checked against the rig."""

    name: str
    pipeline: PipelineConfig
    stages: tuple[GearConfig, ...]
    frames: tuple[Frame, ...]
    expect: tuple[Expect, ...] | None
    dead_letters: int
    at: At


@dataclass(slots=True)
class Outcome:
    """What one test did: ``failure`` is None when it passed."""

    name: str
    failure: str | None
    outputs: list[Frame] = field(default_factory=list)


def load_tests(tests_path: str | os.PathLike[str], rig_path: str | os.PathLike[str]
               ) -> tuple[RigConfig, list[Case]]:
    """Read the tests file and the rig it tests (with the file's ``env`` over the process
    environment).

    Raises:
        ConfigError: in either file: the file, the key path and what was expected.
    """
    tfile = str(tests_path)
    raw = load_yaml(tests_path, os.environ).data
    r = TESTS_FILE.read(raw, At(tfile, ()))
    env = dict(os.environ)
    for k, v in r.mapping("env").items():
        if not isinstance(v, (str, int, float, bool)):
            raise r.where("env").key(k).error(f"expected a text, got {type(v).__name__}")
        env[k] = str(v)
    loaded = load_yaml(rig_path, env)
    cfg = parse_config(loaded.data, str(rig_path), base_dir=Path(rig_path).resolve().parent,
                       origins=loaded.origins)
    cases = [_case(c, cfg) for c in r.sections("tests")]
    return cfg, cases


def _case(c: Any, cfg: RigConfig) -> Case:
    pname = c.optional_string("pipeline")
    if pname is None:
        if len(cfg.pipelines) != 1:
            raise c.where("pipeline").error(
                f"required: the rig has {len(cfg.pipelines)} pipelines "
                f"({', '.join(p.name for p in cfg.pipelines)})")
        pipe = cfg.pipelines[0]
    else:
        found = [p for p in cfg.pipelines if p.name == pname]
        if not found:
            raise c.where("pipeline").error(
                f"no pipeline {pname!r} in the rig (pipelines: "
                f"{', '.join(p.name for p in cfg.pipelines)})")
        pipe = found[0]
    stages = pipe.stages
    if c.given("stages"):
        names = c.sequence("stages")
        known = [s.name for s in pipe.stages]
        for i, n in enumerate(names):
            if n not in known:
                raise c.where("stages").index(i).error(
                    f"no stage {n!r} in pipeline {pipe.name!r} (stages: {', '.join(known)})")
        stages = tuple(s for s in pipe.stages if s.name in names)
    frames = []
    for i, f in enumerate(c.sections("input")):
        ts, src, kind = f.integer("ts"), f.string("src"), f.string("kind")
        headers, body = dict(f.mapping("headers")), f.raw("body")
        try:
            frames.append(decode(encode(Frame(id=uuid7(), ts=ts, src=src, kind=kind,
                                              headers=headers, body=body))))
        except (FrameError, TypeError, ValueError) as exc:
            raise c.where("input").index(i).error(f"not a frame: {exc}") from None
    expect = None
    if c.given("output"):
        expect = tuple(Expect(_checks(e), e.at) for e in c.sections("output"))
    return Case(name=c.string("name"), pipeline=pipe, stages=stages, frames=tuple(frames),
                expect=expect, dead_letters=c.integer("dead_letters"), at=c.at)


def _checks(e: Any) -> dict[str, Any]:
    from gears.celexpr import CelError, Program, compile_expr

    checks: dict[str, Any] = {}
    for name in ("body", "body_has", "headers_has", "kind", "sinks"):
        if e.given(name):
            checks[name] = e.raw(name)
    for name in ("body_has", "headers_has"):
        if name in checks:
            checks[name] = dict(e.mapping(name))
    if "sinks" in checks:
        checks["sinks"] = e.sequence("sinks")
    if e.given("check"):
        raw = e.raw("check")
        texts = raw if isinstance(raw, list) else [raw]
        compiled = []
        for i, text in enumerate(texts):
            at = e.where("check").index(i) if isinstance(raw, list) else e.where("check")
            try:
                compile_expr(text, want_bool=True)  # the error names its own column
                compiled.append((text, Program.build([("check", text)])))
            except CelError as exc:
                raise at.error(str(exc)) from None
        checks["check"] = compiled
    return checks


def run_case(case: Case, data_dir: str) -> Outcome:
    """Feed the case's frames through its stages and check what comes out."""
    letters: list[str] = []

    def dead_letter(frame: Frame, reason: str) -> None:
        letters.append(reason)

    frames = list(case.frames)
    for stage in case.stages:
        cls = gear_class(stage.gear, Stage)
        ctx = GearContext(rack_id="test", pipeline=case.pipeline.name, name=stage.name,
                          replica=0, replicas=1, data_dir=data_dir,
                          log=logging.getLogger(f"fluxrig.test.{stage.name}"),
                          dead_letter=dead_letter)
        gear = cls(stage.settings, ctx)
        try:
            frames = _through(gear, frames, letters)
        finally:
            gear.close()
    sinks = [s.name for s in case.pipeline.sinks]
    routed: list[tuple[Frame, list[str]]] = []
    for frame in frames:
        try:
            routed.append((frame, [sinks[i] for i in targets(frame.headers, sinks)]))
        except RouteError as exc:
            letters.append(str(exc))
    outputs = [f for f, _ in routed]
    failure = _compare(case, routed, letters)
    return Outcome(case.name, failure, outputs)


def _through(gear: Stage, frames: list[Frame], letters: list[str]) -> list[Frame]:
    """One stage the way the rack's worker runs it (``engine.worker.run_stage``)."""
    out: list[Frame] = []
    try:
        gear.process(frames, out.append)
    except Exception:
        out = []
        for frame in frames:
            mine: list[Frame] = []
            try:
                gear.process([frame], mine.append)
            except Exception as exc:
                letters.append(f"{type(exc).__name__}: {exc}")
                continue
            out.extend(mine)
    result = []
    for frame in out:
        try:
            result.append(decode(encode(frame)))  # what the next ring would hold
        except (FrameError, TypeError, ValueError) as exc:
            letters.append(f"not encodable: {exc}")
    return result


def _compare(case: Case, routed: list[tuple[Frame, list[str]]], letters: list[str]
             ) -> str | None:
    if len(letters) != case.dead_letters:
        why = f" ({'; '.join(letters)[:300]})" if letters else ""
        return f"dead_letters: expected {case.dead_letters}, got {len(letters)}{why}"
    if case.expect is None:
        return None
    if len(routed) != len(case.expect):
        return f"output: expected {len(case.expect)} frames, got {len(routed)}"
    for i, ((frame, sinks), want) in enumerate(zip(routed, case.expect)):
        where = f"output[{i}]"
        for name, value in want.checks.items():
            problem = _check(name, value, frame, sinks)
            if problem is not None:
                return f"{where}.{problem}"
    return None


def _check(name: str, want: Any, frame: Frame, sinks: list[str]) -> str | None:
    if name == "body":
        return _differs("body", want, frame.body, subset=False)
    if name == "body_has":
        for path, value in want.items():
            got = _get(frame.body, path.split("."))
            problem = _differs(f"body.{path}", value, got, subset=True)
            if problem is not None:
                return problem
        return None
    if name == "headers_has":
        for key, value in want.items():
            problem = _differs(f"headers.{key}", value, frame.headers.get(key, _UNSET),
                               subset=True)
            if problem is not None:
                return problem
        return None
    if name == "kind":
        return None if frame.kind == want else f"kind: expected {want!r}, got {frame.kind!r}"
    if name == "sinks":
        return None if list(want) == sinks else f"sinks: expected {list(want)}, got {sinks}"
    if name == "check":
        return _cel_checks(want, frame)
    raise AssertionError(name)  # pragma: no cover - _checks builds only the names above


def _cel_checks(compiled: Sequence[tuple[str, Any]], frame: Frame) -> str | None:
    from gears.celexpr import CelError

    for text, program in compiled:
        try:
            value = program.run(frame)[0]
        except CelError as exc:
            return f"check {text!r}: failed: {exc}"
        if value is not True:
            return f"check {text!r}: is {value!r}"
    return None


def _get(value: Any, parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(value, dict) or part not in value:
            return _UNSET
        value = value[part]
    return value


def _differs(where: str, want: Any, got: Any, subset: bool) -> str | None:
    if got is _UNSET:
        return f"{where}: expected {want!r}, missing"
    if subset and isinstance(want, dict) and isinstance(got, dict):
        for k, v in want.items():
            problem = _differs(f"{where}.{k}", v, got.get(k, _UNSET), subset)
            if problem is not None:
                return problem
        return None
    if isinstance(want, dict) and isinstance(got, dict) and want.keys() != got.keys():
        extra = sorted(map(str, got.keys() - want.keys()))
        missing = sorted(map(str, want.keys() - got.keys()))
        return f"{where}: keys differ: missing={missing}, unexpected={extra}"
    if isinstance(want, dict) and isinstance(got, dict):
        for k in want:
            problem = _differs(f"{where}.{k}", want[k], got[k], subset)
            if problem is not None:
                return problem
        return None
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        for i, (w, g) in enumerate(zip(want, got)):
            problem = _differs(f"{where}[{i}]", w, g, subset)
            if problem is not None:
                return problem
        return None
    if want == got and type(want) is type(got) or (
            isinstance(want, (int, float)) and isinstance(got, (int, float))
            and not isinstance(want, bool) and not isinstance(got, bool) and want == got):
        return None
    return f"{where}: expected {want!r}, got {got!r}"


def run_file(tests_path: str | os.PathLike[str], rig_path: str | os.PathLike[str],
             echo: Callable[[str], None]) -> int:
    """Run every test of the file against the rig, printing a line per test and a count.

    Returns:
        0 every test passed, 1 one failed.

    Raises:
        ConfigError: a file is wrong (what and where).
    """
    _, cases = load_tests(tests_path, rig_path)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="fluxrig-test-") as data_dir:
        for i, case in enumerate(cases):
            outcome = run_case(case, data_dir)
            label = f"{tests_path}: tests[{i}] {case.name}"
            if outcome.failure is None:
                echo(f"PASS {label}")
            else:
                failed += 1
                echo(f"FAIL {label}: {outcome.failure}")
    echo(f"{len(cases) - failed} passed, {failed} failed")
    return 1 if failed else 0


__all__ = ["Case", "ConfigError", "Outcome", "load_tests", "run_case", "run_file"]
