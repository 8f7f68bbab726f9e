"""Rig files as YAML: ``${VAR}`` interpolation from the environment, duplicate keys refused.

Reading happens in three steps on PyYAML's node tree (``RigLoader``, a ``SafeLoader``):
compose the nodes, walk them once with their key paths (refusing duplicate keys and
interpolating string values), then construct the Python values.

Interpolation, in string values only (never in keys):

* ``${VAR}`` is the value of environment variable ``VAR`` (set but empty: ""); unset is an
  error naming file, key path and variable. ``${VAR:-default}`` takes ``default`` when
  ``VAR`` is unset or empty (as the shell does). ``$${`` writes a literal ``${``; any other
  ``$`` is just a dollar (the generator's ``"$seq"`` is untouched).
* An interpolated value is text, quoted or not, and YAML never re-reads it (no ``007`` -> 7,
  ``no`` -> false surprises, no structure from the environment). The key that reads it gives
  its type: where the settings reference says integer, number, boolean, duration or size,
  the text is read as one (``port: ${PORT}`` with ``PORT=8080`` is 8080, and so is
  ``{port: "${PORT}"}`` — a flow mapping needs the quotes), and an empty text means the
  key's default (``${PORT:-}``). That reading is ``engine.schema``'s, by the value's key
  path in ``RigYaml.origins``.
* The value of a variable may be a secret: the loader records, per key path, the text
  written in the file (``RigYaml.origins``) and errors about such a value print that text,
  never the value (``engine.schema.At.show``).

Duplicate keys (which YAML forbids and PyYAML silently resolves to the last) are refused
with the key path and both line numbers; keys brought in by a merge (``<<: *base``) may be
overridden, as YAML's merge says.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from engine.schema import At, ConfigError

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
# one token: the escape, a well-formed reference, or a "${" that starts a malformed one
_TOKEN = re.compile(r"\$\$\{|\$\{(?P<name>" + _NAME + r")(?::-(?P<default>[^}]*))?\}|\$\{")
_FORMS = "expected ${NAME} or ${NAME:-default}, and $${ for a literal ${"


@dataclass(frozen=True, slots=True)
class RigYaml:
    """A parsed rig file.

    Attributes:
        data: the YAML document as Python values (None for an empty file).
        origins: key path -> the text written in the file, for every value that took
            something from the environment (hand it to ``At`` so errors hide the value).
    """

    data: object
    origins: Mapping[str, str] = field(default_factory=dict)


def interpolate(text: str, env: Mapping[str, str], at: At) -> tuple[str, bool]:
    """``text`` with every ``${VAR}`` / ``${VAR:-default}`` replaced and ``$${`` unescaped;
    also whether any reference was replaced.

    Raises:
        ConfigError: an unset variable without default, or a malformed reference (at ``at``).
    """
    out: list[str] = []
    pos = 0
    used = False
    for match in _TOKEN.finditer(text):
        out.append(text[pos:match.start()])
        pos = match.end()
        token = match.group(0)
        if token == "$${":
            out.append("${")
            continue
        name = match.group("name")
        if name is None:
            raise at.error(f"invalid reference at character {match.start() + 1} of "
                           f"{text!r}: {_FORMS}")
        used = True
        value = env.get(name)
        default = match.group("default")
        if default is not None and "${" in default:  # ${A:-${B}} would read as "${B" + "}"
            raise at.error(f"nested reference in the default of ${{{name}}}: not supported "
                           f"({_FORMS})")
        if default is not None and not value:
            value = default
        if value is None:
            raise at.error(f"environment variable {name} is not set (write "
                           f"${{{name}:-default}} to give a default)")
        out.append(value)
    out.append(text[pos:])
    return "".join(out), used


class RigLoader(yaml.SafeLoader):
    """A SafeLoader that interpolates ``${VAR}`` and refuses duplicate keys (see the module
    docstring); use ``parse_yaml`` / ``load_yaml``."""

    def __init__(self, text: str, file: str, env: Mapping[str, str]):
        super().__init__(text)
        self.file = file
        self.env = env
        self.origins: dict[str, str] = {}
        self._seen: set[int] = set()  # an alias is walked once, at its first path

    def construct_object(self, node: Node, deep: bool = False) -> object:
        # PyYAML's own constructors raise ValueError & co. for `!!int abc` or `2024-13-45`:
        # give them the node's line like any other YAML error
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, AttributeError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.tag.rsplit(':', 1)[-1]} value: {exc}",
                node.start_mark) from exc

    def walk(self, node: Node, at: At) -> None:
        """Refuse duplicate keys and interpolate string values below ``node`` (at ``at``)."""
        if id(node) in self._seen:
            return
        self._seen.add(id(node))
        if isinstance(node, MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    self.walk(value_node, at)
                    continue
                name = str(key_node.value) if isinstance(key_node, ScalarNode) else "?"
                line = key_node.start_mark.line + 1
                if isinstance(key_node, ScalarNode):
                    ident = (key_node.tag, key_node.value)
                    if ident in first:
                        raise at.key(name).error(
                            f"duplicate key at lines {first[ident]} and {line}")
                    first[ident] = line
                self.walk(value_node, at.key(name))
        elif isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                self.walk(item, at.index(i))
        elif isinstance(node, ScalarNode) and node.tag == _STR_TAG and "$" in node.value:
            written = node.value
            value, used = interpolate(written, self.env, at)
            if used:
                self.origins[at.path] = written
            node.value = value


MAX_RIG_BYTES = 4 * 1024 * 1024  # a rig file is a few KiB; /dev/zero is not one
MAX_EXPANDED = 1_000_000  # values once aliases are expanded (a "billion laughs" file)


def _expanded_size(node: Node, memo: dict[int, int]) -> int:
    """How many values ``node`` stands for once every alias is copied out (linear in the
    number of distinct nodes: an alias is the same node object, counted via ``memo``)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a recursive alias counts once instead of for ever
    total = 1
    if isinstance(node, MappingNode):
        total += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, SequenceNode):
        total += sum(_expanded_size(item, memo) for item in node.value)
    memo[key] = min(total, MAX_EXPANDED + 1)
    return memo[key]


def _yaml_error(file: str, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = f"{where}invalid YAML: {getattr(exc, 'problem', None) or exc}"
    return ConfigError(f"{file}: {problem}", file=file, problem=problem)


def parse_yaml(text: str, file: str, env: Mapping[str, str] | None = None) -> RigYaml:
    """Parse rig-file ``text`` (named ``file`` in errors), interpolating from ``env``
    (default: ``os.environ``).

    Raises:
        ConfigError: bad YAML (with line and column), a duplicate key, an unset variable.
    """
    loader = RigLoader(text, file, os.environ if env is None else env)
    try:
        node = loader.get_single_node()
        if node is None:
            return RigYaml(None)
        if _expanded_size(node, {}) > MAX_EXPANDED:
            problem = (f"too many values once aliases are expanded (more than "
                       f"{MAX_EXPANDED:,}): is an alias repeated into itself?")
            raise ConfigError(f"{file}: {problem}", file=file, problem=problem)
        loader.walk(node, At(file))
        return RigYaml(loader.construct_document(node), dict(loader.origins))
    except yaml.YAMLError as exc:
        raise _yaml_error(file, exc) from exc
    finally:
        loader.dispose()


def load_yaml(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> RigYaml:
    """Read and parse the rig file at ``path`` (see ``parse_yaml``).

    Raises:
        ConfigError: unreadable or non-UTF-8 file, or anything ``parse_yaml`` refuses.
    """
    file = str(path)
    try:
        if Path(path).exists() and not Path(path).is_file():
            raise ConfigError(f"{file}: not a regular file", file=file,
                              problem="not a regular file")
        with open(path, "rb") as f:
            data = f.read(MAX_RIG_BYTES + 1)
        if len(data) > MAX_RIG_BYTES:
            problem = f"larger than {MAX_RIG_BYTES // (1024 * 1024)} MiB: not a rig file"
            raise ConfigError(f"{file}: {problem}", file=file, problem=problem)
        text = data.decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}", file=file,
                          problem=f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text: byte offset {exc.start}"
        raise ConfigError(f"{file}: {problem}", file=file, problem=problem) from exc
    return parse_yaml(text, file, env)
