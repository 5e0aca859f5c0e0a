"""The config schema is honest: every field the code reads (or writes) is declared in
`config_lib.base()`, and every declared field is read somewhere in md4/ or main.py.

The scanner parses the sources with `ast` and follows config objects by data flow, not by
spelling alone:
  - roots: a name or attribute called `config` (`config`, `self.config`, `run.config`), a
    parameter annotated `ConfigDict`, and the result of `base()` / `load()` (config_lib's);
  - aliases: `x = <config path>` and tuple assignments (`t, m = config.training, config.model`);
  - calls: a config path passed (positionally or by keyword) to a function defined in the
    scanned sources binds that function's parameter to the path (`create_datasets(config.data)`
    makes its `data_config` the `data` sub-config), repeated to a fixed point;
  - reads: attribute chains (`config.model.width`), `.get("key")`, `["key"]`, and `[name]` for a
    loop variable over a tuple of string constants; ConfigDict methods (`update`, `to_dict`, ...)
    are not fields.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import pytest

from md4 import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGDICT_METHODS = {"get", "update", "update_from_flattened_dict", "to_dict", "to_json", "lock",
                      "unlock", "items", "keys", "values", "copy_and_resolve_references",
                      "unlocked", "ignore_type", "is_locked", "is_type_safe"}
Path = tuple[str, ...]


def declared(config: ml_collections.ConfigDict, prefix: Path = ()) -> dict[Path, bool]:
  """Every declared path of `config`, mapped to whether it is a sub-config (else a leaf)."""
  out = {}
  for key, value in config.items():
    path = (*prefix, key)
    out[path] = isinstance(value, ml_collections.ConfigDict)
    if out[path]:
      out.update(declared(value, path))
  return out


def sources() -> dict[str, ast.Module]:
  files = [os.path.join(ROOT, "main.py")]
  for folder, _, names in os.walk(os.path.join(ROOT, "md4")):
    files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
  trees = {}
  for path in files:
    with open(path) as f:
      trees[os.path.relpath(path, ROOT)] = ast.parse(f.read(), path)
  return trees


def _is_root_call(node: ast.AST) -> bool:
  """A call of config_lib's base() or load() (by bare name or as config_lib.base)."""
  if not isinstance(node, ast.Call):
    return False
  f = node.func
  name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
  owner = f.value if isinstance(f, ast.Attribute) else None
  return name in ("base", "load") and (
      owner is None or (isinstance(owner, ast.Name) and owner.id == "config_lib"))


def _annotated_configdict(arg: ast.arg) -> bool:
  return arg.annotation is not None and "ConfigDict" in ast.unparse(arg.annotation)


FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def own_nodes(scope: ast.AST):
  """The nodes of a module or function, without the bodies of the functions defined in it."""
  stack = list(ast.iter_child_nodes(scope))
  while stack:
    node = stack.pop()
    yield node
    if not isinstance(node, FUNCTIONS):
      stack.extend(ast.iter_child_nodes(node))


def _called_name(call: ast.Call) -> str | None:
  f = call.func
  return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


class Scanner:
  """Config reads, writes and `.get` defaults across the sources (see the module docstring)."""

  def __init__(self, trees: dict[str, ast.Module], schema: dict[Path, bool]):
    self.trees, self.schema = trees, schema
    self.functions: dict[str, list[ast.AST]] = {}
    for tree in trees.values():
      for node in ast.walk(tree):
        if isinstance(node, FUNCTIONS):
          self.functions.setdefault(node.name, []).append(node)
    self.bound: dict[tuple[int, str], Path] = {}  # (id(function), parameter) -> config path
    self.reads: dict[Path, set[str]] = {}
    self.writes: dict[Path, set[str]] = {}
    self.get_defaults: dict[Path, set[tuple[str, object]]] = {}  # .get("key", constant)

  def is_subconfig(self, path: Path | None) -> bool:
    return path == () or (path is not None and self.schema.get(path, False))

  def path_of(self, node: ast.AST, aliases: dict[str, Path]) -> Path | None:
    """The config path that `node` evaluates to, or None when it is not a config."""
    if isinstance(node, ast.Name):
      return () if node.id == "config" else aliases.get(node.id)
    if _is_root_call(node):
      return ()
    if isinstance(node, ast.Attribute):
      if node.attr == "config":  # self.config, run.config, FLAGS.config (not jax.config)
        return None if isinstance(node.value, ast.Name) and node.value.id == "jax" else ()
      inner = self.path_of(node.value, aliases)
      if self.is_subconfig(inner) and node.attr not in CONFIGDICT_METHODS:
        return (*inner, node.attr)
    if (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
        and isinstance(node.slice.value, str)):
      inner = self.path_of(node.value, aliases)
      if self.is_subconfig(inner):
        return (*inner, node.slice.value)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get" and node.args and isinstance(node.args[0], ast.Constant)):
      inner = self.path_of(node.func.value, aliases)
      if self.is_subconfig(inner):
        return (*inner, node.args[0].value)
    return None

  def scope_aliases(self, scope: ast.AST, outer: dict[str, Path]) -> dict[str, Path]:
    """The names of a scope (its parameters, its assignments) that hold sub-configs."""
    aliases = dict(outer)
    if isinstance(scope, FUNCTIONS):
      a = scope.args
      for arg in a.posonlyargs + a.args + a.kwonlyargs:
        if _annotated_configdict(arg):
          aliases[arg.arg] = ()
        if (id(scope), arg.arg) in self.bound:
          aliases[arg.arg] = self.bound[(id(scope), arg.arg)]
    assigns = [n for n in own_nodes(scope) if isinstance(n, ast.Assign)]
    for _ in range(3):  # aliases of aliases
      for node in assigns:
        for target in node.targets:
          pairs = [(target, node.value)]
          if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
            pairs = list(zip(target.elts, node.value.elts, strict=False))
          for name, value in pairs:
            path = self.path_of(value, aliases)
            if isinstance(name, ast.Name) and self.is_subconfig(path):
              aliases[name.id] = path
    return aliases

  def bind_calls(self, scope: ast.AST, aliases: dict[str, Path]) -> bool:
    """Binds the parameters of functions called here to the sub-configs passed to them (the
    function found by name, when exactly one of the sources defines it); True if any is new."""
    new = False
    for node in own_nodes(scope):
      targets = self.functions.get(_called_name(node), []) if isinstance(node, ast.Call) else []
      if len(targets) != 1:
        continue
      target = targets[0]
      params = [a.arg for a in target.args.posonlyargs + target.args.args]
      params = params[1:] if params[:1] == ["self"] else params
      passed = list(zip(params, node.args, strict=False))
      passed += [(k.arg, k.value) for k in node.keywords if k.arg]
      for param, value in passed:
        path = self.path_of(value, aliases)
        if path and self.is_subconfig(path) and (id(target), param) not in self.bound:
          self.bound[(id(target), param)] = path
          new = True
    return new

  def scopes(self):
    """(scope, enclosing scope or None, file) for every module and function."""
    def visit(scope, parent, file):
      yield scope, parent, file
      for node in own_nodes(scope):
        if isinstance(node, FUNCTIONS):
          yield from visit(node, scope, file)
    for file, tree in self.trees.items():
      yield from visit(tree, None, file)

  def run(self) -> Scanner:
    scopes = list(self.scopes())  # parents come before their functions
    for _ in range(10):  # interprocedural bindings, to a fixed point
      aliases, changed = {}, False
      for scope, parent, _ in scopes:
        aliases[id(scope)] = self.scope_aliases(scope, aliases.get(id(parent), {}))
        changed |= self.bind_calls(scope, aliases[id(scope)])
      if not changed:
        break
    for scope, _, file in scopes:
      self.collect(scope, aliases[id(scope)], file)
    return self

  def collect(self, scope: ast.AST, aliases: dict[str, Path], file: str) -> None:
    loop_values: dict[str, list[str]] = {}  # for name in ("a", "b"): ... config[name]
    for node in own_nodes(scope):
      if (isinstance(node, ast.For) and isinstance(node.target, ast.Name)
          and isinstance(node.iter, ast.Tuple | ast.List)
          and all(isinstance(e, ast.Constant) and isinstance(e.value, str)
                  for e in node.iter.elts)):
        loop_values[node.target.id] = [e.value for e in node.iter.elts]
    for node in own_nodes(scope):
      paths = []
      if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Name):
        inner = self.path_of(node.value, aliases)
        if self.is_subconfig(inner) and node.slice.id in loop_values:
          paths = [(*inner, v) for v in loop_values[node.slice.id]]
      elif isinstance(node, ast.Attribute | ast.Subscript | ast.Call):
        path = self.path_of(node, aliases)
        paths = [path] if path else []
      where = f"{file}:{getattr(node, 'lineno', 0)}"
      for path in paths:
        store = isinstance(getattr(node, "ctx", None), ast.Store)
        (self.writes if store else self.reads).setdefault(path, set()).add(where)
        if (isinstance(node, ast.Call) and len(node.args) == 2
            and isinstance(node.args[1], ast.Constant)):
          self.get_defaults.setdefault(path, set()).add((where, node.args[1].value))


@pytest.fixture(scope="module")
def scan() -> Scanner:
  return Scanner(sources(), declared(config_lib.base())).run()


# Every kind of data flow the scanner follows, with fields base() does not declare.
SYNTHETIC = """
def helper(cfg):
  return cfg.get("undeclared_get", 3), cfg["undeclared_item"]

def use(config):
  t, m = config.training, config.model
  helper(config.data)
  for name in ("undeclared_loop",):
    t[name]
  config.eval.undeclared_write = 1
  return m.undeclared_alias, config.unet.get("embed_dim", 7)

class Method:
  def build(self):
    return self.config.sampling.undeclared_self
"""


def test_the_scanner_follows_each_kind_of_read(scan):
  """On synthetic code with undeclared fields, and on known reads of the real sources (so the
  tests below can fail)."""
  schema = declared(config_lib.base())
  synthetic = Scanner({"synthetic.py": ast.parse(SYNTHETIC)}, schema).run()
  assert {p for p in synthetic.reads if not schema.get(p)} == {
      ("data", "undeclared_get"), ("data", "undeclared_item"), ("training", "undeclared_loop"),
      ("model", "undeclared_alias"), ("unet", "embed_dim"), ("sampling", "undeclared_self")}
  assert set(synthetic.writes) == {("eval", "undeclared_write")}
  assert synthetic.get_defaults == {("data", "undeclared_get"): {("synthetic.py:3", 3)},
                                    ("unet", "embed_dim"): {("synthetic.py:11", 7)}}
  for path in [("model", "width"),  # m = config.model; m.width (text.py)
               ("data", "holdout_fraction"),  # create_datasets(config.data) -> cfg.get(...)
               ("training", "log_every"),  # for name in ("log_every", ...): t[name]
               ("ggm", "renoise_known"),  # self.config.ggm.renoise_known
               ("unet", "embed_dim"),  # u = config.unet; u.embed_dim
               ("sampling", "top_p")]:  # s = self.config.sampling; s.top_p
    assert path in scan.reads, path


def test_every_read_field_is_declared(scan):
  schema = declared(config_lib.base())
  undeclared = {".".join(p): where for p, where in {**scan.reads, **scan.writes}.items()
                if p not in schema}
  assert not undeclared, f"read or written but not declared in base(): {undeclared}"


def test_get_defaults_match_the_schema(scan):
  """A `.get("key", default)` on a config agrees with base() (else there are two defaults)."""
  base = config_lib.base()
  differ = {}
  for path, uses in scan.get_defaults.items():
    value = base
    for key in path:
      value = value[key]
    differ.update({where: (".".join(path), default, value) for where, default in uses
                   if default != value})
  assert not differ, f".get defaults that differ from base(): {differ}"


def test_every_declared_field_is_read(scan):
  schema = declared(config_lib.base())
  unread = [".".join(p) for p, sub in schema.items() if not sub and p not in scan.reads]
  assert not unread, f"declared in base() but read nowhere in md4/ or main.py: {unread}"


@pytest.mark.parametrize("name", sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, "configs"))
                                        if n.endswith(".py") and n != "__init__.py"))
def test_config_files_set_only_declared_fields(name):
  """An experiment file adds no field (base() is not locked, so a typo would add one)."""
  module = __import__(f"configs.{name}", fromlist=["get_config"])
  extra = set(declared(module.get_config())) - set(declared(config_lib.base()))
  assert not extra, f"configs/{name}.py sets undeclared fields: {sorted(extra)}"


def test_declared_data_options_override_and_round_trip(tmp_path):
  """The fields the pipelines read can be set on a locked config, and survive save / load."""
  config = config_lib.base()
  config.lock()
  config.data.update(eval_split="test", tfds_train_split="train[:90%]", source="tfds")
  assert config.data.binarize is None and config.data.flip is None  # the dataset's default
  config.data.binarize, config.model.matmul_dtype = True, "auto"
  with pytest.raises(TypeError):
    config.data.flip = "yes"
  config_lib.validate(config)
  config_lib.save(config, str(tmp_path))
  loaded = config_lib.load(str(tmp_path))
  assert loaded.data.binarize is True and loaded.data.flip is None
  assert (loaded.data.eval_split, loaded.model.matmul_dtype) == ("test", "auto")


@pytest.mark.parametrize("backend, amx, resolved", [("cpu", True, "bfloat16"), ("cpu", False, ""),
                                                    ("gpu", True, "")])
def test_matmul_dtype_auto_resolves_by_host(monkeypatch, caplog, backend, amx, resolved):
  """model.matmul_dtype=auto: bfloat16 operands on a CPU backend with AMX, else the model's
  dtype; the config keeps "auto" and the log says what it became."""
  from md4.methods import text

  monkeypatch.setattr(text, "cpu_has_amx", lambda: amx)
  monkeypatch.setattr(text.jax, "default_backend", lambda: backend)
  text.resolve_matmul_dtype.cache_clear()
  caplog.set_level(logging.INFO)
  try:
    assert text.resolve_matmul_dtype("auto", "float32") == resolved
    assert text.resolve_matmul_dtype("bfloat16", "float32") == "bfloat16"
    assert text.resolve_matmul_dtype("", "float32") == ""
  finally:
    text.resolve_matmul_dtype.cache_clear()
  lines = [r.getMessage() for r in caplog.records if "matmul_dtype" in r.getMessage()]
  assert lines == ["model.matmul_dtype=auto -> " + ("bfloat16 (AMX CPU)" if resolved else
                   f"float32, the model dtype ({backend} backend without AMX)")]
  config = config_lib.base()
  config.model.update(matmul_dtype="auto", width=16, depth=1, num_heads=2)
  model = text.build_transformer(config, 27, num_embeddings=28)
  assert model.matmul_dtype == (jnp.bfloat16 if resolved else None)
  assert config.model.matmul_dtype == "auto"


def test_config_lib_imports_no_model_code():
  code = ("import sys, json; import md4.config_lib; "
          "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('flax', 'optax', 'orbax') or m.startswith(('md4.networks', 'md4.methods', "
          "'md4.training', 'md4.evaluation')))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       check=True, timeout=120)
  assert json.loads(out.stdout) == []


def test_registry_matches_model_types():
  from md4 import methods

  assert set(methods.METHODS) == set(config_lib.MODEL_TYPES)
  assert len(config_lib.MODEL_TYPES) == len(set(config_lib.MODEL_TYPES))
