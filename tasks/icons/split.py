"""The icon world's category split: pretraining categories vs held-out downstream categories.

Rules (applied in order, first match wins, every code point gets a recorded reason):

1. no single-code-point `unicodedata` name (sequences, flags, skin tones, keycaps are never single names);
2. text, modifiers and tags (letters, digits, regional indicators, squared/circled CJK, input symbols);
3. near-invisible glyphs (fewer than `MIN_OPAQUE` of the em square opaque);
4. the held-out categories of the downstream suite (`HELDOUT`);
5. any name containing a held-out word (a held-out name or its head noun, singular or plural), so that
   no held-out concept is ever seen in pretraining, neither as pixels nor as words;
6. reserved icons that look like a held-out category under another name (blowfish next to tropical fish);
7. near-duplicate families (clock faces, smileys, hand gestures, arrows, shapes, ...): at most the listed
   one or two members are kept;
8. everything else is a pretraining category.

`build_category_split()` recomputes the split from the installed font; the stored result is
`tasks/data/icon_split.json`, which is what the library reads (so a newer `unicodedata` with more names
does not silently change the world).
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

MIN_OPAQUE = 0.02  # opaque fraction of the em square below which a glyph counts as near-invisible

# Held-out categories per downstream task, by exact unicodedata name. Order = category order of the task.
HELDOUT: dict[str, tuple[str, ...]] = {
    "icons-aquarium": ("tropical fish", "shark", "octopus", "crab", "dolphin", "whale", "squid"),
    "icons-vehicles": ("automobile", "taxi", "bus", "ambulance", "police car", "delivery truck"),
    "icons-thermal": ("dog", "cat", "horse", "cow"),
    "icons-aerial": ("sailboat", "speedboat", "canoe", "ship", "tent"),
    "icons-described": ("mammoth", "orangutan", "llama", "bagel", "beaver", "dodo"),
}

# Not held out, not pretraining: same look as a held-out category under a different word.
RESERVED: tuple[str, ...] = (
    "fish", "blowfish", "lobster", "shrimp", "fried shrimp", "seal", "spiral shell", "coral", "oyster",
    "spouting whale", "trolleybus", "minibus", "recreational vehicle", "poodle", "rowboat", "ferry",
    "motor boat", "passenger ship", "camping", "boar",
)

_TEXT_PREFIXES = (
    "regional indicator", "tag ", "cancel tag", "emoji modifier", "emoji component", "variation selector",
    "zero width", "combining", "digit", "keycap", "latin", "squared", "negative squared", "circled",
    "input symbol", "rounded symbol", "hyphen", "number sign", "asterisk", "space",
)
_TEXT_NAMES = (
    "copyright sign", "registered sign", "sound recording copyright", "service mark", "trade mark sign",
    "information source", "copyleft symbol", "hundred points symbol", "no one under eighteen symbol",
    "back with leftwards arrow above", "end with leftwards arrow above", "soon with rightwards arrow above",
    "top with upwards arrow above", "on with exclamation mark with left right arrow above",
    "japanese symbol for beginner", "part alternation mark", "wavy dash", "curly loop", "double curly loop",
)

# Near-duplicate families: (family, members (exact names or regex r"re:..."), members kept).
FAMILIES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("clock faces", ("re:^clock face",), ("clock face three oclock",)),
    ("faces", ("re:\\bface\\b", "re:\\bmonkey$", "pile of poo", "kiss mark", "pig nose", "yawning face",
               "rolling on the floor laughing", "biting lip"),
     ("grinning face", "robot face")),
    ("hand gestures", (
        "re:\\b(hand|hands|finger|fingers|fist|thumbs|index|palm|palms|backhand|biceps)\\b",
        "clapping hands sign", "handshake", "sign of the horns", "selfie", "i love you hand sign"),
     ("thumbs up sign", "writing hand")),
    ("people", (
        "boy", "girl", "man", "woman", "family", "police officer", "woman with bunny ears", "bride with veil",
        "person with blond hair", "man with gua pi mao", "man with turban", "older man", "older woman", "baby",
        "construction worker", "princess", "prince", "guardsman", "information desk person", "dancer",
        "man dancing", "haircut", "kiss", "couple with heart", "person bowing deeply", "person frowning",
        "happy person raising one hand", "sleuth or spy", "man in business suit levitating",
        "pregnant woman", "pregnant man", "pregnant person", "breast-feeding", "man in tuxedo",
        "mother christmas", "father christmas", "shrug", "standing person", "kneeling person", "deaf person",
        "adult", "child", "older adult", "bearded person", "person with headscarf", "person in steamy room",
        "person with crown", "people hugging", "pedestrian", "wedding"),
     ("father christmas", "construction worker")),
    ("sports people", (
        "runner", "surfer", "swimmer", "weight lifter", "golfer", "snowboarder", "skier", "bicyclist",
        "mountain bicyclist", "person doing cartwheel", "juggling", "fencer", "wrestlers", "water polo",
        "handball", "person climbing", "person in lotus position", "person with ball", "horse racing"),
     ("skier", "surfer")),
    ("fantasy people", (
        "mage", "fairy", "vampire", "merperson", "elf", "genie", "zombie", "troll", "superhero",
        "supervillain", "ninja", "baby angel", "japanese ogre", "japanese goblin", "imp"),
     ("zombie", "genie")),
    ("silhouettes", ("re:silhouette", "re:^stick figure"), ("bust in silhouette", "stick figure")),
    ("arrows", ("re:\\barrows?\\b",), ("black rightwards arrow", "twisted rightwards arrows")),
    ("shapes", (
        "re:\\b(square|squares|rectangle|triangle|circle|diamond|pentagon|hexagon|octagon|ellipse)\\b",
        "fisheye", "circled equals", "radio button"),
     ("large red circle", "large orange diamond")),
    ("hearts", ("re:\\bhearts?\\b",), ("heavy black heart", "broken heart")),
    ("moons", ("re:\\bmoon\\b",), ("crescent moon", "full moon symbol")),
    ("stars", ("re:\\bstar\\b", "sparkles", "sparkle", "dizzy symbol", "eight spoked asterisk"),
     ("white medium star", "shooting star")),
    ("media controls", (
        "eject symbol", "re:double triangle", "re:pointing triangle", "re:vertical bar",
        "black square for stop", "black circle for record", "re:^power ", "level slider", "control knobs"),
     ("power symbol",)),
    ("zodiac", ("aries", "taurus", "gemini", "cancer", "leo", "virgo", "libra", "scorpius", "sagittarius",
                "capricorn", "aquarius", "pisces", "ophiuchus"), ()),
    ("math signs", ("re:^heavy (plus|minus|division|equals) sign", "heavy multiplication x"),
     ("heavy plus sign",)),
    ("punctuation", ("re:(exclamation|question) mark",), ("black question mark ornament",)),
    ("check marks", ("white heavy check mark", "heavy check mark", "ballot box with check", "cross mark"),
     ("white heavy check mark", "cross mark")),
    ("religious symbols", (
        "orthodox cross", "latin cross", "star of david", "om symbol", "wheel of dharma", "yin yang",
        "peace symbol", "menorah with nine branches", "star and crescent", "six pointed star with middle dot",
        "place of worship", "khanda"),
     ("yin yang", "peace symbol")),
    ("gender signs", ("female sign", "male sign", "male with stroke and male and female sign",
                      "mens symbol", "womens symbol", "restroom", "baby symbol"), ()),
    ("pictogram signs", (
        "re:^no ", "potable water symbol", "non-potable water symbol", "put litter in its place symbol",
        "do not litter symbol", "smoking symbol", "children crossing", "wheelchair symbol",
        "passport control", "customs", "baggage claim", "left luggage", "water closet",
        "mobile phone off", "vibration mode", "antenna with bars", "re:cancellation stroke",
        "re:brightness symbol", "re:sound waves?$", "no entry sign"),
     ("no entry", "wheelchair symbol")),
    ("hazard signs", ("radioactive sign", "biohazard sign", "warning sign", "high voltage sign"),
     ("radioactive sign", "warning sign")),
    ("chess", ("re:chess",), ("white chess knight", "black chess king")),
    ("card suits", ("re:suit$",), ("black spade suit", "black club suit")),
    ("clouds", ("re:\\bcloud\\b", "foggy", "fog", "umbrella with rain drops"), ("cloud", "cloud with rain")),
    ("suns", ("re:\\bsun\\b", "sunrise", "sunrise over mountains", "sunset over buildings"),
     ("black sun with rays",)),
    ("umbrellas", ("re:umbrella",), ("umbrella", "beach with umbrella")),
    ("scenes", ("night with stars", "cityscape at dusk", "bridge at night", "milky way", "cityscape",
                "desert", "desert island", "national park", "stadium", "foggy", "moon viewing ceremony"),
     ("desert island", "national park")),
    ("globes", ("re:^earth globe", "globe with meridians", "world map", "silhouette of japan"),
     ("earth globe americas", "world map")),
    ("trees", ("re:\\btree\\b",), ("palm tree", "evergreen tree")),
    ("buildings", ("re:\\bbuildings?\\b", "re:post office", "hospital", "bank", "hotel", "love hotel",
                   "convenience store", "school", "department store", "factory", "hut", "house with garden"),
     ("house building", "hospital")),
    ("castles", ("re:castle",), ("european castle",)),
    ("mail", ("re:mailbox", "re:envelope", "e-mail symbol", "love letter", "postbox", "outbox tray",
              "inbox tray"),
     ("envelope", "postbox")),
    ("books", ("re:\\bbooks?\\b", "notebook", "notebook with decorative cover", "ledger", "bookmark tabs"),
     ("open book", "notebook")),
    ("paper", ("page with curl", "page facing up", "memo", "spiral note pad", "receipt", "clipboard",
               "card index", "card index dividers", "card file box", "rolled-up newspaper", "newspaper",
               "scroll"),
     ("clipboard", "newspaper")),
    ("calendars", ("re:calendar",), ("spiral calendar pad",)),
    ("charts", ("re:^chart", "bar chart"), ("bar chart",)),
    ("folders", ("re:folder",), ("file folder",)),
    ("pens", ("pencil", "black nib", "re:^lower left", "lock with ink pen"), ("pencil", "lower left paintbrush")),
    ("phones", ("black telephone", "telephone receiver", "re:^mobile phone", "pager", "fax machine"),
     ("black telephone", "mobile phone")),
    ("discs", ("minidisc", "optical disc", "dvd", "floppy disk", "videocassette"), ("optical disc", "floppy disk")),
    ("computers", ("personal computer", "desktop computer", "three button mouse", "trackball"),
     ("desktop computer",)),
    ("cameras", ("camera", "camera with flash", "video camera", "movie camera", "film projector"),
     ("camera", "movie camera")),
    ("magnifiers", ("re:magnifying glass",), ("left-pointing magnifying glass",)),
    ("locks", ("lock", "open lock", "closed lock with key"), ("lock",)),
    ("keys", ("key", "old key"), ("key",)),
    ("bells", ("re:\\bbell\\b",), ("bell",)),
    ("medals", ("re:medal", "reminder ribbon", "rosette"), ("first place medal", "military medal")),
    ("flags", ("re:\\bflags?\\b",), ("chequered flag", "triangular flag on post")),
    ("money", ("re:^banknote", "currency exchange", "heavy dollar sign", "money with wings", "money bag"),
     ("banknote with dollar sign", "money bag")),
    ("rice", ("re:\\brice\\b",), ("rice ball", "cooked rice")),
    ("breads", ("re:bread", "flatbread"), ("bread", "baguette bread")),
    ("apples", ("re:apple$",), ("red apple",)),
    ("ice cream", ("re:\\bice cream\\b", "shaved ice"), ("ice cream",)),
    ("cakes", ("re:cake\\b",), ("birthday cake", "shortcake")),
    ("glasses", ("wine glass", "cocktail glass", "tumbler glass", "clinking glasses", "tropical drink"),
     ("wine glass", "cocktail glass")),
    ("mugs", ("beer mug", "clinking beer mugs"), ("beer mug",)),
    ("cups", ("hot beverage", "teacup without handle", "cup with straw", "mate drink", "bubble tea",
              "beverage box"),
     ("hot beverage", "cup with straw")),
    ("bottles", ("baby bottle", "bottle with popping cork", "sake bottle and cup", "lotion bottle"),
     ("baby bottle", "bottle with popping cork")),
    ("shoes", ("re:\\b(shoe|shoes|sandal|boots|boot)\\b",), ("high-heeled shoe", "hiking boot")),
    ("clothes", ("womans clothes", "t-shirt", "running shirt with sash", "lab coat", "coat", "safety vest"),
     ("t-shirt", "lab coat")),
    ("chicks", ("re:chick\\b",), ("hatching chick",)),
    ("camels", ("re:camel",), ("dromedary camel",)),
    ("oxen", ("ox", "water buffalo", "bison"), ("ox",)),
    ("body parts", ("eyes", "eye", "ear with hearing aid", "mechanical arm", "mechanical leg", "footprints",
                    "paw prints", "anatomical heart"),
     ("eye", "footprints")),
    ("wheelchairs", ("re:wheelchair", "probing cane", "crutch"), ("manual wheelchair",)),
    ("trains", ("re:\\btrain\\b", "metro", "light rail", "tram", "monorail", "re:railway",
                "aerial tramway", "mountain cableway", "station", "steam locomotive"),
     ("steam locomotive", "high-speed train")),
    ("traffic lights", ("re:traffic light",), ("vertical traffic light",)),
    ("airplanes", ("re:airplane",), ("airplane",)),
    ("balls", ("re:\\bball\\b",), ("soccer ball", "crystal ball")),
    ("rackets", ("re:racquet", "table tennis paddle and ball", "re:hockey stick", "lacrosse stick and ball",
                 "cricket bat and ball"),
     ("tennis racquet and ball", "table tennis paddle and ball")),
    ("music notes", ("musical note", "multiple musical notes", "musical score"), ("musical note",)),
    ("speech", ("speech balloon", "thought balloon", "left speech bubble", "right anger bubble"),
     ("speech balloon",)),
    ("symbols", ("anger symbol", "sleeping symbol", "collision symbol", "splashing sweat symbol", "dash symbol",
                 "atom symbol", "black universal recycling symbol", "fleur-de-lis", "trident emblem",
                 "staff of aesculapius", "diamond shape with a dot inside", "nazar amulet", "hamsa"),
     ("collision symbol", "black universal recycling symbol")),
    ("playing cards", ("playing card black joker", "flower playing cards", "mahjong tile red dragon"),
     ("playing card black joker",)),
    ("hats", ("top hat", "womans hat", "billed cap", "graduation cap", "helmet with white cross",
              "military helmet", "crown"),
     ("top hat", "crown")),
    ("bags", ("purse", "handbag", "pouch", "school satchel", "shopping bags", "briefcase", "luggage"),
     ("handbag", "briefcase")),
    ("clocks", ("watch", "alarm clock", "stopwatch", "timer clock", "mantelpiece clock", "hourglass",
                "hourglass with flowing sand"),
     ("alarm clock", "hourglass")),
    ("snowmen", ("snowman", "snowman without snow"), ("snowman",)),
    ("tools", ("hammer and pick", "hammer and wrench", "pick", "hammer", "wrench"), ("hammer", "wrench")),
    ("pins", ("pushpin", "round pushpin", "paperclip", "linked paperclips", "safety pin"),
     ("round pushpin", "paperclip")),
    ("rulers", ("straight ruler", "triangular ruler"), ("straight ruler",)),
    ("cutlery", ("fork and knife", "fork and knife with plate", "spoon", "chopsticks"), ("fork and knife", "spoon")),
    ("baths", ("bath", "bathtub", "shower"), ("bathtub", "shower")),
    ("scooters", ("scooter", "motor scooter"), ("motor scooter",)),
    ("keyboards", ("keyboard", "musical keyboard"), ("keyboard",)),
    ("beetles", ("beetle", "lady beetle", "cockroach", "bug"), ("lady beetle", "bug")),
    ("leaves", ("maple leaf", "fallen leaf", "leaf fluttering in wind", "herb", "four leaf clover", "shamrock",
                "leafy green", "seedling"),
     ("maple leaf", "four leaf clover")),
    ("blossoms", ("blossom", "cherry blossom", "white flower"), ("cherry blossom",)),
    ("skulls", ("skull", "skull and crossbones"), ("skull",)),
    ("aliens", ("alien monster", "extraterrestrial alien"), ("extraterrestrial alien",)),
    ("places of worship", ("church", "mosque", "synagogue", "hindu temple", "kaaba", "shinto shrine"),
     ("church", "mosque")),
    ("loudspeakers", ("speaker", "public address loudspeaker", "cheering megaphone"),
     ("speaker", "cheering megaphone")),
    ("batteries", ("battery", "low battery"), ("battery",)),
    ("glasses frames", ("eyeglasses", "dark sunglasses", "goggles"), ("eyeglasses", "goggles")),
    ("mountains", ("mountain", "snow capped mountain", "mount fuji", "volcano"), ("mountain", "volcano")),
    ("tickets", ("ticket", "admission tickets"), ("ticket",)),
    ("footballs", ("baseball", "softball", "american football", "rugby football"), ("baseball", "american football")),
    ("goats", ("goat", "ram", "sheep"), ("goat", "sheep")),
    ("fowl", ("chicken", "rooster"), ("chicken",)),
    ("beds", ("bed", "sleeping accommodation", "couch and lamp"), ("bed", "couch and lamp")),
    ("drops", ("droplet", "drop of blood"), ("droplet",)),
    ("nests", ("empty nest", "nest with eggs"), ("nest with eggs",)),
)


def _compile(patterns: tuple[str, ...]):
    exact = {p for p in patterns if not p.startswith("re:")}
    regexes = [re.compile(p[3:]) for p in patterns if p.startswith("re:")]
    return lambda name: name in exact or any(r.search(name) for r in regexes)


def head_noun(name: str) -> str:
    """The noun a category name is about: its last word ("police car" -> "car")."""
    return name.split()[-1]


def word_pattern(word: str) -> re.Pattern[str]:
    """Whole-word match of `word` or its plural (`fish`, `fishes`; `bus`, `buses`; `taxi`, `taxis`)."""
    return re.compile(rf"\b{re.escape(word)}(s|es)?\b")


def heldout_words() -> list[str]:
    """Every held-out name and head noun: none of them may occur in a pretraining name or caption."""
    words = set()
    for names in HELDOUT.values():
        for name in names:
            words.add(name)
            words.add(head_noun(name))
    return sorted(words)


def mentions_heldout(text: str) -> str | None:
    """The first held-out word `text` contains (whole word, singular or plural), or None."""
    text = text.lower()
    for word in heldout_words():
        if word_pattern(word).search(text):
            return word
    return None


@dataclass(frozen=True)
class Icon:
    codepoint: int
    name: str


@dataclass(frozen=True)
class CategorySplit:
    """The stored split. `pretrain` are the pretraining categories; `heldout[task]` each task's categories."""

    pretrain: tuple[Icon, ...]
    heldout: dict[str, tuple[Icon, ...]]
    reserved: tuple[Icon, ...]
    unicode_version: str
    openmoji_version: str

    @property
    def pretrain_names(self) -> list[str]:
        return [icon.name for icon in self.pretrain]

    def all_heldout(self) -> list[Icon]:
        return [icon for icons in self.heldout.values() for icon in icons]


def classify(codepoint: int, name: str | None, opaque: float) -> str:
    """The reason a code point is excluded, or "pretrain" / "heldout:<task>" / "reserved"."""
    if name is None:
        return "excluded: no single-code-point name"
    if name.startswith(_TEXT_PREFIXES) or name in _TEXT_NAMES:
        return "excluded: text, modifier or tag"
    if opaque < MIN_OPAQUE:
        return "excluded: near-invisible"
    for task, names in HELDOUT.items():
        if name in names:
            return f"heldout:{task}"
    word = mentions_heldout(name)
    if word is not None:
        return f"excluded: names held-out word '{word}'"
    if name in RESERVED:
        return "reserved"
    for family, members, keep in FAMILIES:
        if _compile(members)(name) and name not in keep:
            return f"excluded: near-duplicate family '{family}'"
    return "pretrain"


def build_category_split(render_size: int = 128) -> dict:
    """Recompute the split from the installed font (slow: renders every glyph once).

    Returns the JSON-ready dict stored as `tasks/data/icon_split.json`.
    """
    from tasks.icons.glyphs import font_codepoints, icon_name, opaque_fraction, openmoji_version, render_glyph

    pretrain, reserved, excluded = [], [], []
    heldout: dict[str, list] = {task: [] for task in HELDOUT}
    for cp in font_codepoints():
        name = icon_name(cp)
        opaque = opaque_fraction(render_glyph(cp, render_size), render_size) if name else 0.0
        verdict = classify(cp, name, opaque)
        entry = {"codepoint": f"{cp:04X}", "name": name}
        if verdict == "pretrain":
            pretrain.append(entry)
        elif verdict == "reserved":
            reserved.append(entry)
        elif verdict.startswith("heldout:"):
            heldout[verdict.split(":", 1)[1]].append(entry)
        else:
            excluded.append({**entry, "reason": verdict.split(": ", 1)[1]})
    for task, names in HELDOUT.items():  # task order = the order in HELDOUT
        found = {e["name"]: e for e in heldout[task]}
        missing = [n for n in names if n not in found]
        if missing:
            raise ValueError(f"held-out categories {missing} of {task} are not single glyphs in this font")
        heldout[task] = [found[n] for n in names]
    return {
        "about": "Icon-world category split; built by tasks.icons.split.build_category_split(). "
                 "Icons: OpenMoji (CC BY-SA 4.0).",
        "unicode_version": unicodedata.unidata_version,
        "openmoji_version": openmoji_version(),
        "pretrain": pretrain,
        "heldout": heldout,
        "reserved": reserved,
        "excluded": excluded,
    }


SPLIT_FILE = "icon_split.json"


@lru_cache(maxsize=1)
def load_category_split() -> CategorySplit:
    """The stored split (`tasks/data/icon_split.json`)."""
    data = json.loads((files("tasks") / "data" / SPLIT_FILE).read_text(encoding="utf-8"))

    def icons(entries) -> tuple[Icon, ...]:
        return tuple(Icon(int(e["codepoint"], 16), e["name"]) for e in entries)

    return CategorySplit(
        pretrain=icons(data["pretrain"]),
        heldout={task: icons(entries) for task, entries in data["heldout"].items()},
        reserved=icons(data["reserved"]),
        unicode_version=data["unicode_version"],
        openmoji_version=data["openmoji_version"],
    )


def write_category_split(path: str | Path | None = None) -> Path:
    """Rebuild and write the split file (maintainers only; the file is versioned with the code)."""
    path = Path(path) if path is not None else Path(__file__).resolve().parents[1] / "data" / SPLIT_FILE
    path.write_text(json.dumps(build_category_split(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    load_category_split.cache_clear()
    return path
