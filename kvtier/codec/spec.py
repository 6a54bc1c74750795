"""Codec specs: the registry of codec names, their options, and the canonical spec string.

A spec is a codec name with optional options: `raw`, `fp8`, `fp8-e5m2:scale=token`, `kivi-2:group=32`,
`cachegen:kbits=4-4-4,vbits=3-4-3`. Parsing validates every name and value (an unknown one is a
ConfigError naming the closest valid one) and fills in defaults. The canonical form lists every
option (`kivi-2:group=64`), so two specs that encode alike have the same canonical string; it is
part of every key namespace, so objects written with different codecs or options never collide.

This module imports nothing heavy (no torch): the config validates codec specs with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.errors import ConfigError, closest


@dataclass(frozen=True, slots=True)
class Option:
    """One codec option: its default, and what values are allowed."""

    default: str
    doc: str
    choices: tuple[str, ...] = ()  # allowed words (choice options)
    low: int = 0  # inclusive bounds of an integer, or of each integer of a list
    high: int = 0
    max_items: int = 1  # > 1: a '-'-separated list of 1..max_items integers ("4-4-3")

    def parse(self, key: str, text: str) -> str:
        """The canonical text of `text` for this option; ConfigError if it is not allowed."""
        if self.choices:
            if text not in self.choices:
                hint = closest(text, self.choices)
                raise ConfigError(f"{key}: {text!r} is not one of {', '.join(self.choices)}{hint}")
            return text
        parts = text.split("-") if self.max_items > 1 else [text]
        if not 1 <= len(parts) <= self.max_items:
            raise ConfigError(f"{key}: {text!r} must be 1 to {self.max_items} integers separated by '-'")
        values = []
        for part in parts:
            try:
                value = int(part)
            except ValueError:
                raise ConfigError(f"{key}: {text!r} is not an integer{' list' if self.max_items > 1 else ''}") from None
            if not self.low <= value <= self.high:
                raise ConfigError(f"{key}: {value} is not between {self.low} and {self.high}")
            values.append(str(value))
        return "-".join(values)


@dataclass(frozen=True, slots=True)
class CodecInfo:
    """A registered codec: where its class lives, its header id, and its options."""

    target: str  # "module:Class", imported on first use
    codec_id: int  # written into every object's header
    doc: str
    options: dict[str, Option] = field(default_factory=dict)


_FP8_SCALE = Option("channel", "one fp32 scale per channel (over tokens) or per token", ("channel", "token"))


def _kivi_group(default: str) -> Option:
    doc = "values per quantization group (keys: tokens of one channel; values: channels of one token)"
    return Option(default, doc, low=2, high=4096)


_BITS_DOC = "bits per value of each layer group (the layers split evenly, first to last)"

CODECS: dict[str, CodecInfo] = {
    "raw": CodecInfo("kvtier.codec.raw:RawCodec", 1, "the tensor's bytes, lossless"),
    "fp8-e4m3": CodecInfo("kvtier.codec.fp8:FP8Codec", 2, "float8 e4m3 with scales", {"scale": _FP8_SCALE}),
    "fp8-e5m2": CodecInfo("kvtier.codec.fp8:FP8Codec", 2, "float8 e5m2 with scales", {"scale": _FP8_SCALE}),
    "kivi-2": CodecInfo(
        "kvtier.codec.kivi:KIVICodec", 3, "2-bit asymmetric, keys per channel, values per token",
        {"group": _kivi_group("64")},
    ),
    "kivi-4": CodecInfo(
        "kvtier.codec.kivi:KIVICodec", 3, "4-bit asymmetric, keys per channel, values per token",
        {"group": _kivi_group("32")},
    ),
    "cachegen": CodecInfo(
        "kvtier.codec.cachegen:CacheGenCodec", 4, "layer-group quantization, anchor deltas, range coding",
        {
            "kbits": Option("4-4-4", "key " + _BITS_DOC, low=2, high=8, max_items=4),
            "vbits": Option("3-4-3", "value " + _BITS_DOC, low=2, high=8, max_items=4),
            "anchor": Option("16", "tokens per anchor group of the key deltas", low=2, high=1024),
            "delta": Option("auto", "key deltas: per layer where smaller, always, never", ("auto", "on", "off")),
        },
    ),
}  # fmt: skip
ALIASES = {"fp8": "fp8-e4m3"}  # short names -> registered names
CODEC_IDS: dict[int, str] = {1: "raw", 2: "fp8", 3: "kivi", 4: "cachegen"}  # header id -> family


@dataclass(frozen=True, slots=True)
class CodecSpec:
    """A parsed, validated codec spec: a registered name and every option's canonical value."""

    name: str
    options: tuple[tuple[str, str], ...]  # sorted by option name, defaults filled in

    @property
    def info(self) -> CodecInfo:
        return CODECS[self.name]

    def option(self, key: str) -> str:
        """The canonical value of option `key`."""
        return dict(self.options)[key]

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.options)


def parse_spec(text: str, key: str = "codec") -> CodecSpec:
    """Parse and validate a codec spec; ConfigError (naming `key`) if anything is wrong."""
    name, _, rest = str(text).strip().lower().partition(":")
    name = ALIASES.get(name.strip(), name.strip())
    if name not in CODECS:
        names = [*CODECS, *ALIASES]
        raise ConfigError(f"{key}: unknown codec {name!r}; available: {', '.join(names)}{closest(name, names)}")
    info = CODECS[name]
    given: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        opt, eq, value = item.partition("=")
        opt = opt.strip()
        if not eq or not value.strip():
            raise ConfigError(f"{key}: option {item!r} of {name} must look like name=value")
        if opt not in info.options:
            allowed = ", ".join(info.options) or "none"
            raise ConfigError(f"{key}: {name} has no option {opt!r} (options: {allowed}){closest(opt, info.options)}")
        if opt in given:
            raise ConfigError(f"{key}: option {opt!r} is given twice")
        given[opt] = info.options[opt].parse(f"{key} option {opt}", value.strip())
    options = tuple(sorted((opt, given.get(opt, o.default)) for opt, o in info.options.items()))
    return CodecSpec(name, options)


def canonical(text: str) -> str:
    """The canonical spec string of `text` (every option listed); part of key namespaces."""
    return str(parse_spec(text))
