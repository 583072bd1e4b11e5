"""Fault 5: malformed YAML and schema-invalid configs, generated as random mutations of the shipped ones.

Whatever the mutation, loading gives either a valid config or a ConfigError naming the file (and, for a
schema error in a mapping, the field): never another exception. A config that loads is then taken by
the registry without raising either.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.config import yamlio
from orchestrator.config.registry import Registry
from orchestrator.config.schema import (
    AggregationSpec,
    AppConfig,
    ModelEntry,
    ResourceMargins,
    ServerSettings,
    StageSpec,
    VoteOptions,
    load_config,
)
from orchestrator.errors import ConfigError
from tests import yamlfile
from tests.conftest import REPO

FILES = ("app.yaml", "models.yaml", "pipeline.yaml")
SHIPPED = {name: (REPO / "config" / name).read_text(encoding="utf-8") for name in FILES}
SHIPPED_DATA = {name: yamlfile.load(text) for name, text in SHIPPED.items()}
SCHEMA_KEYS = sorted({key for model in (AppConfig, ResourceMargins, ServerSettings, ModelEntry, StageSpec,
                                        AggregationSpec, VoteOptions) for key in model.model_fields})
FUZZ = settings(max_examples=int(os.environ.get("CHORUS_FUZZ_EXAMPLES", "200")), deadline=None,  # env: fuzz longer
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------- strategies

YAML_SPECIALS = [*":{}[]-?&*!|>'\"%@`#,\t\n \\", "\x00", "\x85", "\ufeff", "\u2028", "---", "...", "<<: *a", "&a ",
                 "!!python/object:os.system", "!!binary", "? "]
junk = st.lists(st.sampled_from(YAML_SPECIALS) | st.characters(blacklist_categories=("Cs",)),
                min_size=1, max_size=6).map("".join)
NASTY = ["\x00", "~nosuchuser/x", "~", "", " ", "-1", "1e309", "nan", ".inf", "null", "http://", "ftp://x",
         "a{4294967296}", "(" * 400, "{{ " + "(" * 400 + " }}", "{% for %}", "{{ ''.__class__ }}", "..",
         "/dev/null", "/", "x" * 300, "é", "\u202e"]
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63) | st.floats()
           | st.text(max_size=12) | st.sampled_from(NASTY))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(SCHEMA_KEYS) | st.text(max_size=6), inner, max_size=3),
                      max_leaves=6)


@st.composite
def text_mutation(draw: st.DrawFn, name: str) -> str:
    """Break the file as text: truncate, insert junk, re-indent, duplicate, delete or swap lines."""
    text = SHIPPED[name]
    lines = text.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "insert", "indent", "duplicate", "delete", "swap"]))
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        if op == "truncate":
            text = "".join(lines)
            text = text[: draw(st.integers(0, len(text)))]
            lines = text.splitlines(keepends=True)
        elif op == "insert":
            line = lines[i]
            at = draw(st.integers(0, len(line)))
            lines[i] = line[:at] + draw(junk) + line[at:]
        elif op == "indent":
            line = lines[i]
            prefix = draw(st.sampled_from([" ", "  ", "    ", "\t", " \t"]))
            lines[i] = prefix + line if draw(st.booleans()) else line.lstrip(" \t")
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "delete":
            del lines[i]
        else:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
    return "".join(lines)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _get(node: Any, path: tuple) -> Any:
    for part in path:
        node = node[part]
    return node


@st.composite
def data_mutation(draw: st.DrawFn, name: str) -> str:
    """Break the file's data: delete a key, change a value's type, wrap it, rename a key, add a key."""
    data = copy.deepcopy(SHIPPED_DATA[name])
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(data)))
        op = draw(st.sampled_from(["delete", "replace", "wrap_list", "wrap_dict", "rename", "add"]))
        if not path:  # the whole document
            data = draw(values) if op == "replace" else [data] if op == "wrap_list" else data
            continue
        parent, last = _get(data, path[:-1]), path[-1]
        if op == "delete":
            del parent[last]
        elif op == "replace":
            parent[last] = draw(values)
        elif op == "wrap_list":
            parent[last] = [parent[last]]
        elif op == "wrap_dict":
            parent[last] = {draw(st.sampled_from(SCHEMA_KEYS)): parent[last]}
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from(SCHEMA_KEYS) | st.text(max_size=8))] = parent.pop(last)
        elif op == "add":
            target = parent[last] if isinstance(parent[last], dict) else parent
            if isinstance(target, dict):
                target[draw(st.sampled_from(SCHEMA_KEYS))] = draw(values)
        if not isinstance(data, dict | list):
            break
    return yamlfile.dump(data, sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------- the property

@pytest.fixture(scope="module", autouse=True)
def _unchanged_files_parsed_once() -> Iterator[None]:
    """Each example breaks one file; the other two, and the pipeline file the registry reads again, are the
    same text every time and parse to the same data. Their parse (pure-Python YAML, most of an example's time)
    is kept by text, a copy handed out each time; a text met for the first time, and every one that fails,
    is parsed as it comes."""
    parse = yamlio.parse_yaml
    parsed: dict[str, tuple[Any, yaml.Node | None]] = {}

    def parse_once(text: str) -> tuple[Any, yaml.Node | None]:
        if text not in parsed:
            parsed[text] = parse(text)
        data, node = parsed[text]
        return copy.deepcopy(data), node

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(yamlio, "parse_yaml", parse_once)
        yield


@pytest.fixture(scope="module")
def config_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "config"
    shutil.copytree(REPO / "config", path)
    return path.resolve()


def _mapping(text: str) -> bool:
    try:
        return isinstance(yamlfile.load(text), dict)
    except (yaml.YAMLError, RecursionError):
        return False


_REPLACED: dict[Path, str] = {}  # config folder -> its one file that differs from the shipped one


def write_config(config_dir: Path, name: str, text: str | bytes) -> Path:
    """The shipped files, with `name` replaced by `text`. `config_dir` starts as a copy of the shipped files, so
    only the file replaced last time needs putting back (one write per fuzz example, not three)."""
    previous = _REPLACED.get(config_dir)
    if previous is not None and previous != name:
        (config_dir / previous).write_text(SHIPPED[previous], encoding="utf-8")
    _REPLACED[config_dir] = name
    target = config_dir / name
    if isinstance(text, bytes):
        target.write_bytes(text)
    else:
        target.write_text(text, encoding="utf-8")
    return target


def assert_config_error_or_valid(config_dir: Path, name: str, text: str | bytes) -> None:
    target = write_config(config_dir, name, text)
    try:
        config = load_config(config_dir)
        config.load_pipeline()
    except ConfigError as exc:
        assert exc.file == str(target), f"the error names {exc.file}, not the broken {target}"
        assert exc.detail
        if isinstance(text, str) and _mapping(text):  # a schema error inside a mapping names its field
            assert exc.field, f"no field in: {exc}"
        return
    Registry(config).base_pipeline_status()  # a config that loads is usable without raising


@FUZZ
@given(data=st.data(), name=st.sampled_from(FILES))
def test_text_mutations_give_a_config_error_naming_the_file(config_copy: Path, data: st.DataObject,
                                                            name: str) -> None:
    assert_config_error_or_valid(config_copy, name, data.draw(text_mutation(name)))


@FUZZ
@given(data=st.data(), name=st.sampled_from(FILES))
def test_schema_mutations_give_a_config_error_naming_file_and_field(config_copy: Path, data: st.DataObject,
                                                                   name: str) -> None:
    assert_config_error_or_valid(config_copy, name, data.draw(data_mutation(name)))


@FUZZ
@given(name=st.sampled_from(FILES), cut=st.integers(0, 10_000), noise=st.binary(min_size=1, max_size=16))
def test_binary_garbage_gives_a_config_error(config_copy: Path, name: str, cut: int, noise: bytes) -> None:
    raw = SHIPPED[name].encode()
    assert_config_error_or_valid(config_copy, name, raw[: cut % (len(raw) + 1)] + noise)


# ---------------------------------------------------------------- regressions the fuzzing found

STAGE = "stages:\n  - name: s\n    models: [gemma3-270m]\n"
VOTE = "    aggregation: {type: majority_vote, vote: {extract: regex, pattern: '%s'}}\n"


@pytest.mark.parametrize(("name", "text", "field"), [
    # a NUL byte in a path: Path.resolve() raised ValueError
    ("app.yaml", 'models_dir: "/tmp/x\\0y"\n', "models_dir"),
    # an unknown user's home: expanduser() raised RuntimeError
    ("app.yaml", "llama_server: ~nosuchuser-chorus/llama-server\n", "llama_server"),
    ("models.yaml", 'models:\n  m:\n    file: "a\\0.gguf"\n', "models.m.file"),
    # a regex repeat count past the C int: re.compile raised OverflowError; deep groups: RecursionError
    ("pipeline.yaml", STAGE + VOTE % "a{4294967296}", "stages[0].aggregation.vote"),
    ("pipeline.yaml", STAGE + VOTE % ("(" * 1200), "stages[0].aggregation.vote"),
    # a template nesting past the recursion limit: jinja's parser raised RecursionError
    ("pipeline.yaml", STAGE + f"    prompt: '{{{{ {'(' * 3000} }}}}'\n", "stages[0].prompt"),
    # duplicate keys: YAML kept the last one silently
    ("models.yaml", "models:\n  m: {file: a.gguf}\n  m: {file: b.gguf}\n", "models.m"),
    ("pipeline.yaml", STAGE + "    temperature: 0.1\n    temperature: 0.9\n", "stages[0].temperature"),
    # a pipeline-wide check that named no field
    ("pipeline.yaml", STAGE + "  - name: s\n    models: [gemma3-270m]\n", "stages"),
    # an empty key: the field path was empty
    ("app.yaml", "'': ../models\n", "''"),
])
def test_inputs_that_once_raised_other_exceptions_are_config_errors(config_copy: Path, name: str, text: str,
                                                                    field: str) -> None:
    write_config(config_copy, name, text)
    with pytest.raises(ConfigError) as err:
        load_config(config_copy).load_pipeline()
    assert err.value.file == str(config_copy / name)
    assert err.value.field == field, str(err.value)


def test_duplicate_keys_name_both_lines(config_copy: Path) -> None:
    write_config(config_copy, "models.yaml", "models:\n  m: {file: a.gguf}\n  x: {file: c.gguf}\n  m: {file: b.gguf}\n")
    with pytest.raises(ConfigError) as err:
        load_config(config_copy)
    assert err.value.line == 4 and "also on line 2" in err.value.detail


def test_a_top_level_list_says_the_file_must_be_a_mapping(config_copy: Path) -> None:
    write_config(config_copy, "pipeline.yaml", "- name: s\n  models: [gemma3-270m]\n")
    with pytest.raises(ConfigError) as err:
        load_config(config_copy).load_pipeline()
    assert "must be a mapping" in err.value.detail and err.value.file == str(config_copy / "pipeline.yaml")


def test_a_model_file_under_an_unknown_home_is_missing_not_a_crash(config_copy: Path) -> None:
    write_config(config_copy, "models.yaml", "models:\n  m: {file: ~nosuchuser-chorus/m.gguf}\n")
    registry = Registry(load_config(config_copy))
    rec = registry.records["m"]
    assert rec.status == "missing" and rec.reason and "nosuchuser-chorus" in rec.reason
