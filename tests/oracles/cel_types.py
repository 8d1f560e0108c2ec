"""The type check the API server runs on a ValidatingAdmissionPolicy's CEL, as far as a walk of
cel-python's parse tree can do it (cel-python 0.5 evaluates but has no type checker).

What it ports, from k8s.io/apiserver at tag v0.30.0 (Kubernetes 1.30, our minimum):

- pkg/admission/plugin/cel/compile.go:46-87, ``BuildRequestType``: the declared type of
  ``request``; :92-137, ``BuildNamespaceType``: ``namespaceObject``; :238-241: at admission
  ``object`` and ``oldObject`` are ``dyn``, ``request`` is typed.
- pkg/admission/plugin/policy/validating/plugin.go:112-142: variables, match conditions,
  validations and message expressions are compiled in that environment (a compile error there
  fails every matched request under ``failurePolicy: Fail``); validations and match conditions
  must be ``bool``, message expressions ``string``; a variable's type is its expression's.
- pkg/admission/plugin/policy/validating/typechecking.go:108-140, 198-227: the advisory type
  check (warnings in the policy's status) compiles each validation and message expression once
  per matched kind with ``object``/``oldObject`` typed by the kind's OpenAPI schema. Its
  ``extractVersions`` (:348-357) gives up on a ``*`` version; this check does not.
- pkg/cel/common/schemas.go:40-183, ``SchemaDeclType``: OpenAPI schema to CEL type (objects with
  properties are objects with exactly those fields, ``additionalProperties`` a map of strings,
  int-or-string ``dyn``, ``date-time`` a timestamp, ``byte`` bytes, ``integer`` int, ``number``
  double; a resource root always has ``apiVersion``, ``kind``, ``metadata.name`` and
  ``metadata.generateName``).
- pkg/cel/environment/base.go:49-131, the language options of the base environment:
  homogeneous list and map literals, cross-type numeric ordering (not equality).

So every expression is checked twice: against ``dyn`` objects (what admission compiles) and
against each matched kind's schema (what the type checker warns about, here an error). The
walk covers the operators, literals, ``has``, the comprehension macros and ``size``,
``startsWith``/``endsWith``/``contains``/``matches`` and the type conversions; any other function
or syntax raises :class:`CELTypeError` ("not modelled"), so the check fails closed instead of
passing what it cannot judge. What stays unproven is listed in charts/README.md.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import celpy
from lark import Token, Tree


class CELTypeError(Exception):
    """An expression the API server's CEL checker would refuse (or this walk cannot judge)."""


# -- types -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prim:
    name: str

    def __str__(self) -> str:
        return self.name


DYN, BOOL, INT, UINT, DOUBLE = Prim("dyn"), Prim("bool"), Prim("int"), Prim("uint"), Prim("double")
STRING, BYTES, NULL = Prim("string"), Prim("bytes"), Prim("null_type")
TIMESTAMP, DURATION, TYPE = (Prim("google.protobuf.Timestamp"), Prim("google.protobuf.Duration"),
                             Prim("type"))
NUMBERS = (INT, UINT, DOUBLE)
ORDERED = (INT, UINT, DOUBLE, STRING, BYTES, BOOL, TIMESTAMP, DURATION)


@dataclass(frozen=True)
class ListOf:
    elem: Any

    def __str__(self) -> str:
        return f"list({self.elem})"


@dataclass(frozen=True)
class MapOf:
    key: Any
    value: Any

    def __str__(self) -> str:
        return f"map({self.key}, {self.value})"


@dataclass(frozen=True, eq=False)
class Obj:
    """An object type: ``fields`` maps each field name to a thunk of its type (schemas recurse)."""

    name: str
    fields: Mapping[str, Callable[[], Any]] = field(repr=False)

    def field_type(self, name: str) -> Any:
        if name not in self.fields:
            raise CELTypeError(f"undefined field '{name}' of {self.name} (fields: "
                               f"{', '.join(sorted(self.fields)) or 'none'})")
        return self.fields[name]()

    def __str__(self) -> str:
        return self.name


def obj(type_name: str, /, **fields: Any) -> Obj:
    return Obj(type_name, {k: (lambda v=v: v) for k, v in fields.items()})


def member_type(container: Any) -> Any | None:
    """What ``in`` tests and a comprehension's variable ranges over: a list's elements, a map's
    keys, dyn for dyn; None for anything else (no overload)."""
    if isinstance(container, ListOf):
        return container.elem
    if isinstance(container, MapOf):
        return container.key
    return DYN if container is DYN else None


def assignable(a: Any, b: Any) -> bool:
    """Whether values of types ``a`` and ``b`` may meet in ``==``, a ternary or a literal."""
    if a is DYN or b is DYN or a == b or a is b:
        return True
    if NULL in (a, b):  # null meets object types (messages in cel-go), not scalars
        return isinstance(a if b is NULL else b, Obj)
    if isinstance(a, ListOf) and isinstance(b, ListOf):
        return assignable(a.elem, b.elem)
    if isinstance(a, MapOf) and isinstance(b, MapOf):
        return assignable(a.key, b.key) and assignable(a.value, b.value)
    return False


def join(a: Any, b: Any) -> Any:
    """The type of a value that is ``a`` or ``b`` (both assignable): the more specific one."""
    return b if a is DYN or a is NULL else a


# -- Kubernetes types --------------------------------------------------------------------------

def request_type() -> Obj:
    """``request`` (compile.go:46-87 at v0.30.0)."""
    gvk = obj("kubernetes.GroupVersionKind", group=STRING, version=STRING, kind=STRING)
    gvr = obj("kubernetes.GroupVersionResource", group=STRING, version=STRING, resource=STRING)
    user = obj("kubernetes.UserInfo", username=STRING, uid=STRING, groups=ListOf(STRING),
               extra=MapOf(STRING, ListOf(STRING)))
    return obj("kubernetes.AdmissionRequest", kind=gvk, resource=gvr, subResource=STRING,
               requestKind=gvk, requestResource=gvr, requestSubResource=STRING, name=STRING,
               namespace=STRING, operation=STRING, userInfo=user, dryRun=BOOL, options=DYN)


def namespace_type() -> Obj:
    """``namespaceObject`` (compile.go:92-137 at v0.30.0)."""
    condition = obj("kubernetes.NamespaceCondition", status=STRING, type=STRING,
                    lastTransitionTime=TIMESTAMP, message=STRING, reason=STRING)
    meta = obj("kubernetes.NamespaceMetadata", name=STRING, generateName=STRING,
               namespace=STRING, labels=MapOf(STRING, STRING),
               annotations=MapOf(STRING, STRING), UID=STRING, creationTimestamp=TIMESTAMP,
               deletionGracePeriodSeconds=INT, deletionTimestamp=TIMESTAMP, generation=INT,
               resourceVersion=STRING, finalizers=ListOf(STRING))
    return obj("kubernetes.Namespace", metadata=meta,
               spec=obj("kubernetes.NamespaceSpec", finalizers=ListOf(STRING)),
               status=obj("kubernetes.NamespaceStatus", conditions=ListOf(condition),
                          phase=STRING))


def _types_of(schema: Mapping[str, Any]) -> set[str]:
    declared = schema.get("type")
    types = set(declared) if isinstance(declared, list) else {declared} if declared else set()
    return types - {"null"}  # kubernetes-validate marks every field nullable


def schema_type(schema: Mapping[str, Any], resolve: Callable[[str], Mapping[str, Any]], *,
                name: str, root: bool = False) -> Any:
    """The CEL type of an OpenAPI (or kubernetes-validate JSON) schema, as ``SchemaDeclType``
    makes it; None where that function exposes nothing (the field is then undefined)."""
    if "$ref" in schema:
        return schema_type({**resolve(schema["$ref"]), **{k: v for k, v in schema.items()
                                                          if k not in ("$ref", "description")}},
                           resolve, name=name, root=root)
    if (schema.get("x-kubernetes-int-or-string") or schema.get("format") == "int-or-string"
            or "oneOf" in schema or "anyOf" in schema):
        # int-or-string is dyn; kubernetes-validate writes it (and Quantity, a string in the
        # API server's OpenAPI) as oneOf: both dyn here, which is weaker, never stricter.
        return DYN
    types = _types_of(schema)
    if root:
        schema = _with_type_and_object_meta(schema)
        types = {"object"}
    if len(types) != 1:
        return None
    (kind,) = types
    if kind == "array":
        items = schema.get("items")
        if items is None:
            return None
        elem = schema_type(items, resolve, name=f"{name}[]",
                           root=bool(items.get("x-kubernetes-embedded-resource")))
        return None if elem is None else ListOf(elem)
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            value = schema_type(extra, resolve, name=f"{name}{{}}",
                                root=bool(extra.get("x-kubernetes-embedded-resource")))
            return None if value is None else MapOf(STRING, value)
        props = schema.get("properties") or {}

        def thunk(prop_name: str, prop: Mapping[str, Any]) -> Callable[[], Any]:
            @functools.cache
            def typed() -> Any:
                return schema_type(prop, resolve, name=f"{name}.{prop_name}",
                                   root=bool(prop.get("x-kubernetes-embedded-resource")))
            return typed

        thunks = {k: thunk(k, v) for k, v in props.items()}
        # A property whose schema exposes nothing is no field (SchemaDeclType skips it).
        return Obj(name, _ExposedFields(thunks))
    if kind == "string":
        return {"byte": BYTES, "duration": DURATION, "date": TIMESTAMP,
                "date-time": TIMESTAMP}.get(schema.get("format", ""), STRING)
    return {"boolean": BOOL, "number": DOUBLE, "integer": INT}.get(kind)


class _ExposedFields(Mapping[str, Callable[[], Any]]):
    """Field thunks without the properties whose type is None (resolved on first look)."""

    def __init__(self, thunks: dict[str, Callable[[], Any]]):
        self._thunks = thunks

    def __getitem__(self, key: str) -> Callable[[], Any]:
        thunk = self._thunks[key]
        if thunk() is None:
            raise KeyError(key)
        return thunk

    def __contains__(self, key: object) -> bool:
        return key in self._thunks and self._thunks[key]() is not None

    def __iter__(self) -> Iterator[str]:
        return (k for k in self._thunks if self._thunks[k]() is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _with_type_and_object_meta(schema: Mapping[str, Any]) -> dict[str, Any]:
    """schemas.go:66-71: apiVersion, kind, metadata.name and metadata.generateName at a root."""
    props = dict(schema.get("properties") or {})
    props.setdefault("apiVersion", {"type": "string"})
    props.setdefault("kind", {"type": "string"})
    meta = dict(props.get("metadata") or {"type": "object"})
    if "$ref" not in meta:
        meta_props = dict(meta.get("properties") or {})
        meta_props.setdefault("name", {"type": "string"})
        meta_props.setdefault("generateName", {"type": "string"})
        meta = {**meta, "type": "object", "properties": meta_props}
    props["metadata"] = meta
    return {**schema, "type": "object", "properties": props}


_KUBE_SCHEMAS = "kubernetes-json-schema"


@functools.cache
def _kube_definitions(kube_version: str) -> dict[str, Any]:
    return json.loads(_kube_file(kube_version, "_definitions.json"))["$defs"]


def _kube_file(kube_version: str, name: str) -> str:
    root = resources.files("kubernetes_validate") / _KUBE_SCHEMAS
    folder = f"v{kube_version}.0-local-strict"
    path = root / folder / name
    if not path.is_file():
        raise CELTypeError(f"kubernetes-validate has no schema {folder}/{name}")
    return path.read_text()


def _kube_resolver(kube_version: str) -> Callable[[str], Mapping[str, Any]]:
    defs = _kube_definitions(kube_version)

    def resolve(ref: str) -> Mapping[str, Any]:
        return defs[ref.rsplit("/", 1)[-1]]
    return resolve


def builtin_kind_type(kind: str, api_version: str, kube_version: str) -> Obj:
    """A built-in kind's type from kubernetes-validate's bundled schemas (the official OpenAPI)."""
    group, _, version = api_version.rpartition("/")
    prefix = f"{group.split('.')[0]}-" if group else ""
    schema = json.loads(_kube_file(kube_version, f"{kind.lower()}-{prefix}{version}.json"))
    return schema_type(schema, _kube_resolver(kube_version), name=f"{api_version}.{kind}",
                       root=True)


def crd_kind_types(crd: Mapping[str, Any], kube_version: str) -> dict[str, Obj]:
    """Per served version, the custom kind's type. Its ``metadata`` is ObjectMeta, as in the
    OpenAPI the API server publishes for a CRD (the CRD's own schema says only ``object``)."""
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    meta = {"$ref": "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    out = {}
    for ver in crd["spec"]["versions"]:
        if not ver.get("served", True):
            continue
        schema = dict(ver["schema"]["openAPIV3Schema"])
        schema["properties"] = {**schema.get("properties", {}), "metadata": meta}
        out[ver["name"]] = schema_type(schema, _kube_resolver(kube_version),
                                       name=f"{group}/{ver['name']}.{kind}", root=True)
    return out


# -- the walk ----------------------------------------------------------------------------------

_PARSER = celpy.Environment()
_MACROS = {"all", "exists", "exists_one", "map", "filter"}
_STRING_METHODS = {"startsWith": STRING, "endsWith": STRING, "contains": STRING,
                   "matches": STRING}
_CONVERSIONS = {"int": INT, "uint": UINT, "double": DOUBLE, "string": STRING, "bytes": BYTES,
                "bool": BOOL, "dyn": DYN, "duration": DURATION, "timestamp": TIMESTAMP}
# (operator, left, right, result): the standard arithmetic overloads.
_ARITHMETIC = (
    [(op, t, t, t) for op in ("add", "sub", "mul", "div") for t in NUMBERS]
    + [("mod", t, t, t) for t in (INT, UINT)]
    + [("add", STRING, STRING, STRING), ("add", BYTES, BYTES, BYTES),
       ("add", TIMESTAMP, DURATION, TIMESTAMP), ("add", DURATION, TIMESTAMP, TIMESTAMP),
       ("add", DURATION, DURATION, DURATION), ("sub", TIMESTAMP, TIMESTAMP, DURATION),
       ("sub", TIMESTAMP, DURATION, TIMESTAMP), ("sub", DURATION, DURATION, DURATION)])
_LITERALS = {"INT_LIT": INT, "UINT_LIT": UINT, "FLOAT_LIT": DOUBLE, "STRING_LIT": STRING,
             "MLSTRING_LIT": STRING, "BYTES_LIT": BYTES, "BOOL_LIT": BOOL, "NULL_LIT": NULL}


def check(expression: str, env: Mapping[str, Any]) -> Any:
    """The type of ``expression`` with the variables of ``env`` declared; raises CELTypeError
    naming the expression and the reason where cel-go's checker would refuse it."""
    try:
        return _Walk(dict(env)).expr(_PARSER.compile(expression))
    except CELTypeError as exc:
        raise CELTypeError(f"{exc} in: {' '.join(expression.split())}") from None


class _Walk:
    def __init__(self, env: dict[str, Any]):
        self.env = env

    def expr(self, node: Tree) -> Any:
        method = getattr(self, f"_{node.data}", None)
        if method is None:
            raise CELTypeError(f"{node.data} is not modelled by this check")
        return method(_kids(node))

    # precedence levels: one child passes through, two (or three) apply the operator
    def _expr(self, kids: list) -> Any:
        if len(kids) == 1:
            return self.expr(kids[0])
        cond, yes, no = (self.expr(k) for k in kids)
        self._want(cond, BOOL, "the ternary's condition")
        if not assignable(yes, no):
            raise CELTypeError(f"the ternary's branches are {yes} and {no}")
        return join(yes, no)

    def _conditionalor(self, kids: list) -> Any:
        return self._logical(kids, "||")

    def _conditionaland(self, kids: list) -> Any:
        return self._logical(kids, "&&")

    def _logical(self, kids: list, op: str) -> Any:
        if len(kids) == 1:
            return self.expr(kids[0])
        for k in kids:
            self._want(self.expr(k), BOOL, f"an operand of {op}")
        return BOOL

    def _relation(self, kids: list) -> Any:
        if len(kids) == 1:
            return self.expr(kids[0])
        op_node, right_node = kids
        (left_node,) = _kids(op_node)
        left, right = self.expr(left_node), self.expr(right_node)
        op = op_node.data.removeprefix("relation_")
        if op in ("eq", "ne"):
            if not assignable(left, right):
                raise CELTypeError(f"no overload of {'==' if op == 'eq' else '!='} for "
                                   f"({left}, {right})")
        elif op == "in":
            container_key = member_type(right)
            if container_key is None or not assignable(left, container_key):
                raise CELTypeError(f"no overload of 'in' for ({left}, {right})")
        else:
            ok = (DYN in (left, right) or (left == right and left in ORDERED)
                  or (left in NUMBERS and right in NUMBERS))  # cross-type numeric ordering
            if not ok:
                raise CELTypeError(f"no overload of '{op}' for ({left}, {right})")
        return BOOL

    def _addition(self, kids: list) -> Any:
        return self._arithmetic(kids)

    def _multiplication(self, kids: list) -> Any:
        return self._arithmetic(kids)

    def _arithmetic(self, kids: list) -> Any:
        if len(kids) == 1:
            return self.expr(kids[0])
        op_node, right_node = kids
        (left_node,) = _kids(op_node)
        left, right = self.expr(left_node), self.expr(right_node)
        op = op_node.data.split("_")[1]
        if isinstance(left, ListOf) and isinstance(right, ListOf) and op == "add":
            if not assignable(left, right):
                raise CELTypeError(f"no overload of 'add' for ({left}, {right})")
            return ListOf(join(left.elem, right.elem))
        # The overloads whose operands the arguments fit (dyn fits any): one result type is
        # the expression's, several make it dyn (cel-go resolves those at run time).
        results = {res for o, a, b, res in _ARITHMETIC if o == op
                   and left in (a, DYN) and right in (b, DYN)}
        if DYN in (left, right) and (isinstance(left, ListOf) or isinstance(right, ListOf)):
            results.add(left if isinstance(left, ListOf) else right)
        if not results:
            raise CELTypeError(f"no overload of '{op}' for ({left}, {right})")
        return results.pop() if len(results) == 1 else DYN

    def _unary(self, kids: list) -> Any:
        if len(kids) == 1:
            return self.expr(kids[0])
        op, operand = kids
        t = self.expr(operand)
        if op.data == "unary_not":
            self._want(t, BOOL, "the operand of !")
            return BOOL
        if t is DYN or t in (INT, DOUBLE):
            return t
        raise CELTypeError(f"no overload of unary '-' for {t}")

    def _member(self, kids: list) -> Any:
        return self.expr(kids[0])

    def _primary(self, kids: list) -> Any:
        return self.expr(kids[0])

    def _paren_expr(self, kids: list) -> Any:
        return self.expr(kids[0])

    def _literal(self, kids: list) -> Any:
        return _LITERALS[kids[0].type]

    def _ident(self, kids: list) -> Any:
        name = str(kids[0])
        if name in ("authorizer", "params") and name not in self.env:
            raise CELTypeError(f"'{name}' is not modelled by this check")
        if name not in self.env:
            raise CELTypeError(f"undeclared reference to '{name}'")
        return self.env[name]

    def _member_dot(self, kids: list) -> Any:
        operand, name = self.expr(kids[0]), str(kids[1])
        return select(operand, name)

    def _member_index(self, kids: list) -> Any:
        operand, index = self.expr(kids[0]), self.expr(kids[1])
        if operand is DYN:
            return DYN
        if isinstance(operand, ListOf):
            if index not in (INT, DYN):
                raise CELTypeError(f"a list index must be int, got {index}")
            return operand.elem
        if isinstance(operand, MapOf):
            if not assignable(index, operand.key):
                raise CELTypeError(f"a key of {operand} must be {operand.key}, got {index}")
            return operand.value
        raise CELTypeError(f"{operand} cannot be indexed")

    def _list_lit(self, kids: list) -> Any:
        items = [self.expr(k) for k in _kids(kids[0])] if kids else []
        return ListOf(self._homogeneous(items, "list"))

    def _map_lit(self, kids: list) -> Any:
        flat = [self.expr(k) for k in _kids(kids[0])] if kids else []
        return MapOf(self._homogeneous(flat[0::2], "map key"),
                     self._homogeneous(flat[1::2], "map value"))

    @staticmethod
    def _homogeneous(types: list, what: str) -> Any:
        """base.go: HomogeneousAggregateLiterals; the empty literal's elements are dyn."""
        out = DYN
        for t in types:
            if not assignable(out, t):
                raise CELTypeError(f"{what} literal mixes {out} and {t}")
            out = join(out, t)
        return out

    def _ident_arg(self, kids: list) -> Any:
        name = str(kids[0])
        args = _kids(kids[1]) if len(kids) > 1 else []
        if name == "has":
            (arg,) = args
            select_node = _only_select(arg)
            if select_node is None:
                raise CELTypeError("has() takes a field selection, x.f")
            self._member_dot(_kids(select_node))
            return BOOL
        types = [self.expr(a) for a in args]
        if name == "size" and len(types) == 1:
            return _size(types[0])
        if name in _CONVERSIONS and len(types) == 1:
            return _CONVERSIONS[name]
        if name == "type" and len(types) == 1:
            return TYPE
        raise CELTypeError(f"function {name}() is not modelled by this check")

    def _member_dot_arg(self, kids: list) -> Any:
        target, name = kids[0], str(kids[1])
        args = _kids(kids[2]) if len(kids) > 2 and kids[2] is not None else []
        if name in _MACROS:
            return self._macro(self.expr(target), name, args)
        receiver = self.expr(target)
        types = [self.expr(a) for a in args]
        if name == "size" and not types:
            return _size(receiver)
        if name in _STRING_METHODS and len(types) == 1:
            self._want(receiver, STRING, f"the receiver of {name}()")
            self._want(types[0], _STRING_METHODS[name], f"the argument of {name}()")
            return BOOL
        raise CELTypeError(f"function {name}() on {receiver} is not modelled by this check")

    def _macro(self, range_type: Any, name: str, args: list) -> Any:
        var_type = member_type(range_type)
        if var_type is None:
            raise CELTypeError(f"{name}() ranges over a list or map, not {range_type}")
        var = _only_ident(args[0]) if args else None
        if var is None or len(args) not in (2, 3) or (len(args) == 3 and name != "map"):
            raise CELTypeError(f"{name}() takes a variable name and an expression")
        inner = _Walk({**self.env, var: var_type})
        steps = [inner.expr(a) for a in args[1:]]
        if name == "map":
            if len(steps) == 2:
                self._want(steps[0], BOOL, "map()'s filter")
            return ListOf(steps[-1])
        self._want(steps[0], BOOL, f"{name}()'s predicate")
        return ListOf(var_type) if name == "filter" else BOOL

    @staticmethod
    def _want(got: Any, want: Any, what: str) -> None:
        if not assignable(got, want):
            raise CELTypeError(f"{what} must be {want}, got {got}")


def select(operand: Any, name: str) -> Any:
    if operand is DYN:
        return DYN
    if isinstance(operand, Obj):
        return operand.field_type(name)
    if isinstance(operand, MapOf):
        if not assignable(operand.key, STRING):
            raise CELTypeError(f"field selection .{name} on {operand}")
        return operand.value
    raise CELTypeError(f"{operand} has no field '{name}'")


def _size(t: Any) -> Any:
    if t is DYN or t in (STRING, BYTES) or isinstance(t, ListOf | MapOf):
        return INT
    raise CELTypeError(f"no overload of size() for {t}")


def _kids(node: Tree) -> list:
    return [k for k in node.children if k is not None]


def _descend(node: Any) -> Any:
    """Down through single-child precedence levels to the node that does something."""
    while isinstance(node, Tree) and node.data in (
            "expr", "conditionalor", "conditionaland", "relation", "addition", "multiplication",
            "unary", "member", "primary") and len(_kids(node)) == 1:
        node = _kids(node)[0]
    return node


def _only_select(node: Tree) -> Tree | None:
    found = _descend(node)
    return found if isinstance(found, Tree) and found.data == "member_dot" else None


def _only_ident(node: Tree) -> str | None:
    found = _descend(node)
    if isinstance(found, Tree) and found.data == "ident":
        token = found.children[0]
        return str(token) if isinstance(token, Token) else None
    return None


# -- a whole policy ----------------------------------------------------------------------------

@dataclass
class PolicyCheck:
    """What :func:`check_policy` looked at: per kind (and once for ``dyn`` objects), each
    expression's path in the policy and its type."""

    types: dict[str, dict[str, Any]]


def check_policy(policy: Mapping[str, Any], kinds: Mapping[str, Obj]) -> PolicyCheck:
    """Check every expression of a ValidatingAdmissionPolicy (variables in order, then match
    conditions, validations and message expressions) with ``object``/``oldObject`` of each
    type in ``kinds`` and once as ``dyn``; raise CELTypeError naming the kind and the path."""
    spec = policy["spec"]
    if spec.get("paramKind"):
        raise CELTypeError("paramKind is not modelled by this check")
    out: dict[str, dict[str, Any]] = {}
    for kind_name, kind in {"dyn (admission)": DYN, **kinds}.items():
        env: dict[str, Any] = {"object": kind, "oldObject": kind, "request": request_type(),
                               "namespaceObject": namespace_type()}
        seen: dict[str, Any] = {}
        variables: dict[str, Any] = {}
        env["variables"] = obj("kubernetes.variables")
        for i, var in enumerate(spec.get("variables", [])):
            where = f"spec.variables[{i}] ({var['name']})"
            variables[var["name"]] = seen[where] = _checked(var["expression"], env, kind_name,
                                                            where, None)
            env["variables"] = obj("kubernetes.variables", **variables)
        for i, cond in enumerate(spec.get("matchConditions", [])):
            where = f"spec.matchConditions[{i}] ({cond['name']})"
            seen[where] = _checked(cond["expression"], env, kind_name, where, BOOL)
        for i, rule in enumerate(spec.get("validations", [])):
            where = f"spec.validations[{i}]"
            seen[f"{where}.expression"] = _checked(rule["expression"], env, kind_name,
                                                   f"{where}.expression", BOOL)
            if rule.get("messageExpression"):
                seen[f"{where}.messageExpression"] = _checked(
                    rule["messageExpression"], env, kind_name, f"{where}.messageExpression",
                    STRING)
        for i, note in enumerate(spec.get("auditAnnotations", [])):
            where = f"spec.auditAnnotations[{i}].valueExpression"
            seen[where] = _checked(note["valueExpression"], env, kind_name, where, STRING)
        out[kind_name] = seen
    return PolicyCheck(out)


def _checked(expression: str, env: Mapping[str, Any], kind: str, where: str,
             result: Any) -> Any:
    try:
        got = check(expression, env)
    except CELTypeError as exc:
        raise CELTypeError(f"{where}, object {kind}: {exc}") from None
    # compile.go CompileCELExpression: the output type must be exactly the one asked for.
    if result is not None and got != result:
        raise CELTypeError(f"{where}, object {kind}: must evaluate to {result}, got {got}")
    return got
