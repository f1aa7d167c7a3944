"""The feature spec: what an encoded table holds and what a model must embed.

It is written by the ``features`` pipeline (and extended with the domain field by
``domains``), stored as JSON in the catalog, and read by every model builder. It
depends on the standard library only, so ``models/`` and ``training/`` stay
importable with torch alone.

Index conventions for every field (shared by the encoder and the models):
``0`` is padding (empty slot of a multi-valued field), ``1`` is out-of-vocabulary,
known values start at ``2``. ``vocab_size`` counts the two reserved indices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

PAD_INDEX = 0
OOV_INDEX = 1
FIRST_VALUE_INDEX = 2

FieldKind = Literal["categorical", "sequence"]

#: Field roles a model config may name instead of a column (``"@user"``), after the
#: papers: APG's condition z = U, I, C; AdaSparse's domain.
ROLES = ("user", "item", "context", "domain")


@dataclass(frozen=True)
class FieldSpec:
    """One encoded field.

    Args:
        name: field name; the encoded table holds column ``name`` for a categorical
            field and columns ``name__0 .. name__{max_len-1}`` plus ``name__len`` for
            a sequence (multi-valued) field.
        kind: ``"categorical"`` (one index per row) or ``"sequence"`` (up to
            ``max_len`` indices per row, padded with ``PAD_INDEX``).
        vocab_size: number of embedding rows, reserved indices included.
        max_len: slots per row (1 for categorical fields).
        source: what the field describes: ``user``, ``item``, ``context`` or
            ``domain``; conditions and domain-aware models select fields by it.
    """

    name: str
    kind: FieldKind
    vocab_size: int
    max_len: int = 1
    source: str = "context"

    def __post_init__(self) -> None:
        if self.kind not in ("categorical", "sequence"):
            raise ValueError(f"field {self.name!r}: unknown kind {self.kind!r}")
        if self.vocab_size < FIRST_VALUE_INDEX:
            raise ValueError(f"field {self.name!r}: {self.vocab_size=} must be >= 2")
        if self.max_len < 1 or (self.kind == "categorical" and self.max_len != 1):
            raise ValueError(f"field {self.name!r}: bad {self.max_len=} for kind {self.kind}")

    @property
    def columns(self) -> list[str]:
        """Index columns of this field in the encoded table, in slot order."""
        if self.kind == "categorical":
            return [self.name]
        return [f"{self.name}__{i}" for i in range(self.max_len)]

    @property
    def length_column(self) -> str | None:
        return f"{self.name}__len" if self.kind == "sequence" else None


@dataclass(frozen=True)
class FeatureSpec:
    """All fields of an encoded table, in model order.

    Args:
        fields: categorical and sequence fields; models embed them in this order.
        label: name of the 0/1 label column.
        user_field: field used as the user key (GAUC by user, frequency groups).
        item_field: field used as the item key.
        domain_field: field holding the domain id (set by the ``domains`` pipeline).
        context_field: the context field of APG's mix-wise condition (U, I, C), set
            per data set by ``features.roles``.
    """

    fields: tuple[FieldSpec, ...]
    label: str = "label"
    user_field: str | None = None
    item_field: str | None = None
    domain_field: str | None = None
    context_field: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate field names in feature spec: {names}")
        for role in ("user_field", "item_field", "domain_field", "context_field"):
            value = getattr(self, role)
            if value is not None and value not in names:
                raise ValueError(f"{role}={value!r} is not one of the fields {names}")

    def __getitem__(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"no field {name!r} in feature spec; fields are {[f.name for f in self.fields]}")

    def field_for_role(self, role: str) -> str | None:
        """The field this data set maps ``role`` (one of ``ROLES``) to, or None."""
        if role not in ROLES:
            raise ValueError(f"unknown field role {role!r}; roles: {list(ROLES)}")
        return getattr(self, f"{role}_field")

    @property
    def categorical(self) -> tuple[FieldSpec, ...]:
        return tuple(f for f in self.fields if f.kind == "categorical")

    @property
    def sequences(self) -> tuple[FieldSpec, ...]:
        return tuple(f for f in self.fields if f.kind == "sequence")

    @property
    def index_columns(self) -> list[str]:
        """Columns of the model input matrix, in slot order: categorical fields
        first (one slot each), then every slot of every sequence field."""
        cols = [f.name for f in self.categorical]
        for f in self.sequences:
            cols.extend(f.columns)
        return cols

    @property
    def num_slots(self) -> int:
        return len(self.index_columns)

    def with_field(self, new: FieldSpec, **roles: str | None) -> FeatureSpec:
        """A copy with ``new`` appended (or replacing the field of the same name)."""
        kept = tuple(f for f in self.fields if f.name != new.name)
        values = {**asdict(self), **roles}
        values["fields"] = (*kept, new)
        return FeatureSpec.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fields"] = [asdict(f) for f in self.fields]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        fields = tuple(FieldSpec(**f) if isinstance(f, dict) else f for f in d["fields"])
        return cls(
            fields=fields,
            label=d.get("label", "label"),
            user_field=d.get("user_field"),
            item_field=d.get("item_field"),
            domain_field=d.get("domain_field"),
            context_field=d.get("context_field"),
            metadata=dict(d.get("metadata") or {}),
        )
