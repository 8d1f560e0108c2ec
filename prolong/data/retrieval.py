"""Synthetic retrieval text: HELMET's recall phrasing, and training documents written in it.

One home for the phrasing so that the training data and the evaluation can never drift apart:
:mod:`prolong.eval.synthetic` builds JSON KV and RULER prompts from the templates and key/value
makers here, and the ``retrieval`` embedded corpus (:func:`retrieval_documents`) and the SFT
retrieval dialogues (:func:`retrieval_dialogue`) are written with the same ones.

Why a retrieval domain at all: a model that has never seen a key looked up in its context has no
reason to learn to copy over long distances from a few hundred steps of code and prose; a tiny
quickstart model then scores 0 on every recall task whatever the long-context recipe did.
ProLong's own mix has no such domain (its 8B model learned retrieval in pretraining); a
user who adds one to a large run should know it is the evaluation's phrasing (see the README).

Training documents ask several questions about one context (one answer per question), so every
document teaches retrieval at several depths. Each ends with its questions, so a document cut at a
row end keeps a valid prefix (context, then some answered questions); what carries over into the
next row is only questions without their context, a few tokens.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator

KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."
KV_PREFIX = "Corresponding value:"

# RULER's needle and question templates as HELMET phrases them (data.py, load_ruler).
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
ONE_QUESTION = ("A special magic {one} is hidden within the following text. Make sure to memorize "
                "it. I will quiz you about the {one} afterwards.\n{context}\nWhat is the special "
                "magic {one} for {query} mentioned in the provided text?")
ONE_PREFIX = "The special magic {one} for {query} mentioned in the provided text is"
ALL_QUESTION = ("Some special magic {kind} are hidden within the following text. Make sure to "
                "memorize it. I will quiz you about the {kind} afterwards.\n{context}\nWhat are all "
                "the special magic {kind} for {query} mentioned in the provided text?")
ALL_PREFIX = "The special magic {kind} for {query} mentioned in the provided text are"

_ADJECTIVES = (
    "able acid aged airy alert amber ample angry arid ashen awake bald bare basic bent big bitter "
    "black bland blank blind blond blue blunt bold brave brief bright brisk broad brown bumpy busy "
    "calm candid chilly civic clean clear clever close cloudy coarse cold cool coral cosy crisp "
    "cruel curly cute damp dark dear deep dense dim dizzy dry dull dusty eager early easy elder "
    "empty equal even exact faint fair false fancy fast fat fierce fine firm flat fluffy fond "
    "foggy frail free fresh frosty full fuzzy gentle giant glad glossy golden good grand gray great "
    "green grim gritty happy hard harsh hasty heavy hidden high hollow holy honest huge humble "
    "icy idle inner ivory jolly keen kind large late lazy lean light lime little lively lofty "
    "long loose loud lucky lunar mad magic major mellow merry mild minor misty modest moist "
    "narrow neat new nice noble noisy odd oily old olive open orange pale patient plain polite "
    "poor proud pure purple quick quiet rapid rare raw ready real red rich rigid ripe rosy rough "
    "round royal rude rusty sad safe salty sandy scarce sharp shiny short shy silent silky silver "
    "simple slim slow small smart smooth soft solar solid sour spare spicy stale steady steep "
    "sticky stiff still stormy strong sunny sweet swift tall tame tender thick thin tidy tiny "
    "tired tough true urban vague vast violet vivid warm wary weak wet white whole wide wild wise "
    "witty wooden young zany")
_NOUNS = (
    "acorn actor anchor angle apple arch arrow attic autumn badge bagel ballad banjo barn basket "
    "beach beacon bean bell bench berry bird blade blanket boat bonnet book bottle boulder bow "
    "bridge brook broom bucket button cabin cable cactus camel candle canoe canyon carpet castle "
    "cat cellar chair chalk channel cheese cherry chimney cider circle cliff clock cloud clover "
    "coast comet compass cookie copper cork cotton cradle crane crater creek crown crystal cup "
    "daisy desert diamond dinner dog dolphin door dragon drum eagle echo engine falcon feather "
    "fence fern ferry fiddle field flame flute forest fossil fountain fox garden garnet gate "
    "ginger glacier glove goat grape harbor harp hat hawk helmet hill honey horizon horse island "
    "jacket jewel kettle kite ladder lake lamp lantern lemon letter lily lion lizard meadow "
    "melon mirror monkey moon mountain mule needle nest oak ocean orchard otter owl paddle palace "
    "panda parrot path pearl pebble pepper piano pillow pine planet plum pond poppy puzzle quartz "
    "quill rabbit raven reef ribbon river robin rocket rose saddle sail salmon scarf shell ship "
    "shovel silk sparrow spoon spruce star statue stone storm stream sugar swan table thistle "
    "thunder tiger timber tomato tower trail tulip tunnel turtle valley vase violin wagon walnut "
    "whale wheel willow window wizard wolf yarn zebra")
ADJECTIVES = tuple(_ADJECTIVES.split())
NOUNS = tuple(_NOUNS.split())


def uuid4(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def word_keys(rng: random.Random) -> Iterator[str]:
    """Distinct word keys, endlessly: adjective-noun, then adjective-adjective-noun once most
    two-word keys are taken."""
    seen: set[str] = set()
    pairs = len(ADJECTIVES) * len(NOUNS)
    while True:
        if len(seen) < pairs * 0.7:
            key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        else:
            key = f"{rng.choice(ADJECTIVES)}-{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in seen:
            seen.add(key)
            yield key


def seven_digits(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


# ---------------------------------------------------------------------------------------------
# Training documents
# ---------------------------------------------------------------------------------------------

KINDS = ("json_kv", "needle_words", "needle_uuids")
"""Document kinds, drawn in turn: a JSON object with lookups (HELMET's json_kv), needles with word
keys and 7-digit values (RULER MK needle), needles with UUID keys and values (RULER MK uuid)."""
DEMOS = 2  # json_kv prompts carry two demo lookups of keys that are not in the object
QUESTIONS = (3, 6)  # questions per document, inclusive range


def kv_document(rng: random.Random, pairs: int, questions: int) -> str:
    """A JSON object of ``pairs`` UUID pairs, the instruction, two demos (pairs not in the object,
    as HELMET's prompt has), then ``questions`` lookups of keys from the object."""
    kv = [(uuid4(rng), uuid4(rng)) for _ in range(pairs)]
    demos = [(uuid4(rng), uuid4(rng)) for _ in range(DEMOS)]
    asked = rng.sample(kv, min(questions, pairs))
    lookups = "".join(f"Key: {k}\n{KV_PREFIX} {v}\n\n" for k, v in demos + asked)
    return f"{json.dumps(dict(kv), indent=0)}\n\n{KV_INSTRUCTION}\n\n{lookups}".rstrip() + "\n"


def needle_document(rng: random.Random, needles: int, questions: int, *, uuids: bool) -> str:
    """RULER's multi-key needle haystack (the other needles are the distractors), then
    ``questions`` questions each answered in the prompt's answer phrasing."""
    kind, one = ("uuids", "uuid") if uuids else ("numbers", "number")
    words = word_keys(rng)
    pairs = [(uuid4(rng) if uuids else next(words), uuid4(rng) if uuids else seven_digits(rng))
             for _ in range(needles)]
    context = "\n".join(NEEDLE.format(kind=kind, key=k, value=v) for k, v in pairs)
    intro = ONE_QUESTION.split("{context}")[0].format(one=one)
    out = [intro + context]
    for key, value in rng.sample(pairs, min(questions, needles)):
        out.append(f"What is the special magic {one} for {key} mentioned in the provided text?\n"
                   f"{ONE_PREFIX.format(one=one, query=key)} {value}.")
    return "\n".join(out) + "\n"


# Characters each kind's unit (pair or needle) adds: sizes documents without a tokenizer (the
# corpus is built before the tokenizer that is trained on it).
UNIT_CHARS = {"json_kv": 80, "needle_words": 62, "needle_uuids": 118}


def retrieval_documents(seed: int, count: int, *, min_chars: int, max_chars: int,
                        kinds: tuple[str, ...] = KINDS) -> Iterator[str]:
    """``count`` documents whose context sizes are log-uniform between ``min_chars`` and
    ``max_chars`` characters, ``kinds`` in turn (a kind named twice comes twice as often); a pure
    function of the arguments."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"retrieval kinds {unknown or '()'}: expected some of {', '.join(KINDS)}")
    rng = random.Random(f"retrieval/{seed}")
    for i in range(count):
        kind = kinds[i % len(kinds)]
        chars = min_chars * (max_chars / min_chars) ** rng.random()
        units = max(1, round(chars / UNIT_CHARS[kind]))
        questions = rng.randint(*QUESTIONS)
        if kind == "json_kv":
            yield kv_document(rng, units, questions)
        else:
            yield needle_document(rng, units, questions, uuids=kind == "needle_uuids")


# ---------------------------------------------------------------------------------------------
# SFT dialogues
# ---------------------------------------------------------------------------------------------

def retrieval_dialogue(rng: random.Random, *, max_units: int = 24) -> list[dict[str, str]]:
    """A user hands over a JSON object or a needle list and asks for values, 1-3 turns; the
    assistant answers in the recall prompts' answer phrasing."""
    units = rng.randint(2, max_units)
    if rng.random() < 0.5:
        kv = {uuid4(rng): uuid4(rng) for _ in range(units)}
        keys = list(kv)
        messages = []
        for turn in range(rng.randint(1, 3)):
            key = rng.choice(keys)
            ask = f"Key: {key}" if turn else (
                f"{json.dumps(kv, indent=0)}\n\n{KV_INSTRUCTION}\n\nKey: {key}")
            messages += [{"role": "user", "content": ask},
                         {"role": "assistant", "content": f"{KV_PREFIX} {kv[key]}"}]
        return messages
    words = word_keys(rng)
    pairs = {next(words): seven_digits(rng) for _ in range(units)}
    context = "\n".join(NEEDLE.format(kind="numbers", key=k, value=v) for k, v in pairs.items())
    messages = []
    for turn in range(rng.randint(1, 3)):
        key = rng.choice(list(pairs))
        question = f"What is the special magic number for {key} mentioned in the provided text?"
        ask = question if turn else ONE_QUESTION.format(one="number", context=context, query=key)
        messages += [{"role": "user", "content": ask},
                     {"role": "assistant",
                      "content": f"{ONE_PREFIX.format(one='number', query=key)} {pairs[key]}."}]
    return messages
