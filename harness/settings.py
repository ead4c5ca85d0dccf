"""One settings object per model: a frozen dataclass whose fields are every training choice.

Each answer file declares ``Settings`` (the fields, each commented with what it does and where it
comes from) and two instances side by side: ``DEFAULT``, what the script trains, and ``TEMPLATE``,
the course template's training, which ``--template`` selects. Any field can then be overridden
from the command line in one generic way, ``--set name=value`` (repeatable), and the resolved
settings are saved with the checkpoint and in ``metrics.json``::

    python a3_gan_template.py --set r1_gamma=0 --set lr=2e-4
"""

import dataclasses
import types
import typing

NONE_WORDS = ("none", "null")
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


class SettingsError(ValueError):
    """A ``--set`` that names no field, or a value its field cannot take."""


def add_arguments(parser):
    """``--template`` and ``--set name=value``, the two ways a run's settings are chosen."""
    parser.add_argument("--template", action="store_true",
                        help="train as the course template does (the script's TEMPLATE settings)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="overrides",
                        help="override one field of the settings (repeatable), e.g. --set lr=2e-4; "
                             "the fields are the script's Settings dataclass")
    return parser


def _field_types(cls):
    return typing.get_type_hints(cls)


def _parse_value(text, kind, name):
    """``text`` as a value of the annotated type ``kind`` (bool, int, float, str, or X | None)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(kind) if option is not type(None)]
        if text.lower() in NONE_WORDS:
            return None
        (kind,) = options
    if kind is bool:
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise SettingsError(f"--set {name}={text}: {name} is true or false")
    try:
        value = kind(text)
    except ValueError:
        raise SettingsError(f"--set {name}={text}: {name} is a{'n' if kind is int else ''} "
                            f"{kind.__name__}") from None
    if kind in (int, float) and not 0 <= value < float("inf"):
        raise SettingsError(f"--set {name}={text}: {name} is a finite number >= 0")
    return value


def override(settings, assignments):
    """``settings`` with the ``name=value`` strings of ``assignments`` applied, each value parsed by
    its field's type; a SettingsError names a bad one."""
    types_ = _field_types(type(settings))
    changes = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        name = name.strip()
        if not sep:
            raise SettingsError(f"--set {assignment}: write name=value")
        if name not in types_:
            known = ", ".join(field.name for field in dataclasses.fields(settings))
            raise SettingsError(f"--set {assignment}: no setting {name!r} (the settings are: {known})")
        changes[name] = _parse_value(text.strip(), types_[name], name)
    return dataclasses.replace(settings, **changes)


def resolve(args, default, template):
    """The settings a run trains with: ``template`` with --template, else ``default``, then the
    ``--set`` overrides. A bad override is an argparse-style error (exit status 2)."""
    try:
        return override(template if args.template else default, args.overrides)
    except SettingsError as error:
        raise SystemExit(f"error: {error}") from None


def as_dict(settings):
    return dataclasses.asdict(settings)


def differences(settings, base):
    """{name: value} of the fields in which ``settings`` differ from ``base``."""
    return {field.name: getattr(settings, field.name) for field in dataclasses.fields(settings)
            if getattr(settings, field.name) != getattr(base, field.name)}


def describe(settings):
    """One line of ``name=value`` pairs, for logs."""
    return " ".join(f"{name}={value}" for name, value in as_dict(settings).items())


def one_of(settings, name, choices):
    """Raise SettingsError unless the field ``name`` holds one of ``choices``."""
    value = getattr(settings, name)
    if value not in choices:
        raise SettingsError(f"--set {name}={value}: {name} is one of {', '.join(choices)}")


def positive(settings, *names):
    """Raise SettingsError unless every named field is > 0."""
    for name in names:
        value = getattr(settings, name)
        if value is not None and value <= 0:
            raise SettingsError(f"setting {name} must be positive, got {value}")

