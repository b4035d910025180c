"""The router's evaluation split, made by a different method than its training data: the
training questions (`data/suitability.jsonl`) are written one by one by hand; these are composed
from question frames and slot fillers (seeded), each frame labelled once by the SoT rule in
`data/SUITABILITY.md`. Its topics and phrasings are drawn apart from the training rows, so a
router that learnt topics rather than the shape of the answer scores badly here.

    python -m pice.scheduler.compose_eval   # rewrites data/suitability_eval.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "suitability_eval.jsonl"
PER_FRAME = 8
SEED = 15

_TOPICS = ["beekeeping", "urban rooftop farming", "learning Portuguese", "remote pair programming",
           "owning a sailboat", "night shift work", "running a food truck", "home composting",
           "public libraries", "long-distance trains", "freelance translation", "birdwatching",
           "indoor climbing gyms", "community theatre", "electric buses", "wild swimming"]
_THINGS = ["a standing desk", "a heat pump", "solar roof tiles", "a mechanical keyboard",
           "a smartwatch", "a cargo bike", "a pressure cooker", "an e-reader", "a robot vacuum",
           "a home gym", "a dashcam", "a water filter"]
_PAIRS = [("Rust", "Go"), ("yoga", "pilates"), ("a credit union", "a bank"),
          ("tea", "coffee"), ("hostels", "hotels"), ("podcasts", "audiobooks"),
          ("Linux", "macOS"), ("a gap year", "starting university at once"),
          ("trains", "planes for trips under 600 km"), ("Spanish", "French")]
_PROFESSIONS = ["a pharmacist", "a lighthouse engineer", "a sommelier", "a park ranger",
                "a forensic accountant", "a midwife", "a game designer", "a harbor pilot"]
_AUDIENCES = ["new parents", "retirees", "first-year students", "small shop owners",
              "night-shift nurses", "people who work from home"]
_EVENTS = ["the printing press had never been invented", "every city banned private cars",
           "people could photosynthesize", "the internet went offline for a month",
           "the moon were twice as close", "everyone retired at forty",
           "paper money disappeared overnight", "summer lasted all year"]
_PHRASES = ["where is the train station", "I would like a coffee", "happy birthday",
            "see you tomorrow", "I am sorry", "how much does this cost"]
_LANG_SETS = ["French, Italian and Dutch", "Japanese, Korean and Mandarin",
              "Swedish, Polish and Greek", "Portuguese, Turkish and Swahili"]
_GENRES = ["a short essay", "a product review", "a formal letter", "a poem", "a short story",
           "a wedding speech", "a cover letter", "a newspaper editorial"]
_CHARACTERS = [("a Viking chieftain", "rally your warriors before the battle"),
               ("Cleopatra", "greet a Roman envoy"), ("a weary detective", "narrate your day"),
               ("a talking parrot", "complain about your owner"),
               ("a spaceship captain", "address the crew after a crash landing"),
               ("a 1920s radio host", "open tonight's show"),
               ("an old oak tree", "tell the forest's history in the first person"),
               ("a nervous job candidate", "answer the first interview question")]
_PROCESSES = ["a seed becomes a tree", "steel is made from iron ore",
              "a hurricane forms over the ocean", "a letter of credit is settled between banks",
              "the kidneys filter blood", "a volcano erupts", "yogurt is made from milk",
              "a rumor spreads through a town"]
_PROCEDURES = ["change the oil in a motorcycle", "set up a freshwater aquarium",
               "install a ceiling fan", "make fresh pasta by hand", "replace a laptop battery",
               "knit a simple scarf", "register a small business", "descale an espresso machine"]
_CODE = ["reverses the words in a sentence", "checks whether a year is a leap year",
         "merges two sorted lists", "counts vowels in a string", "parses a CSV line",
         "returns the n-th prime", "flattens a nested list", "validates an email address"]
_SENTENCES = ["The meeting has been moved to Thursday afternoon.",
              "Please keep your luggage with you at all times.",
              "The museum is closed on Mondays.", "My brother lives near the old harbor."]
_LANGS = ["German", "Spanish", "Italian", "Japanese"]
_FACTS = ["the Berlin Wall fall", "the first Moon landing happen", "the Titanic sink",
          "Japan host its first Olympic Games", "the euro enter circulation",
          "the Eiffel Tower open"]
_FERMI = [("piano tuners", "Chicago"), ("golf balls", "a school bus"),
          ("hairs", "a human head"), ("dogs", "London"), ("grains of rice", "a kilogram bag"),
          ("windows", "Manhattan")]

# (category, suits a sketch, frame); a frame's slots come from the lists above
_FRAMES: list[tuple[str, bool, str]] = [
    ("aspects", True, "What are the main advantages and drawbacks of {thing}?"),
    ("advice", True, "Give me some practical tips for getting started with {topic}."),
    ("advice", True, "What should {audience} keep in mind about {topic}?"),
    ("roleplay-advice", True, "As {profession}, what advice would you give {audience}?"),
    ("comparison", True, "Compare {a} and {b}: which suits whom?"),
    ("counterfactual", True, "What would change if {event}?"),
    ("list-request", True, "Say '{phrase}' in {langs}."),
    ("list-request", True, "Suggest a few ideas for a weekend project about {topic}."),
    ("multi-part", True, "What is {topic} like, who is it for, and what does it cost?"),
    ("writing-task", False, "Write {genre} about {topic}."),
    ("roleplay-performance", False, "Pretend you are {character} and {performance}."),
    ("process", False, "Explain the process by which {process}."),
    ("procedure", False, "Give me step-by-step instructions to {procedure}."),
    ("coding", False, "Write a Python function that {code}."),
    ("math", False, "What is {x} multiplied by {y}, minus {z}?"),
    ("translation-one", False, "Translate into {lang}: \"{sentence}\""),
    ("factoid", False, "In what year did {fact}?"),
    ("fermi", False, "Roughly how many {count} are there in {place}?"),
]


def compose(seed: int = SEED, per_frame: int = PER_FRAME) -> list[dict[str, object]]:
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    seen: set[str] = set()
    for fi, (category, suits, frame) in enumerate(_FRAMES):
        made = 0
        for _ in range(per_frame * 20):
            if made == per_frame:
                break
            a, b = rng.choice(_PAIRS)
            character, performance = rng.choice(_CHARACTERS)
            count, place = rng.choice(_FERMI)
            q = frame.format(
                thing=rng.choice(_THINGS), topic=rng.choice(_TOPICS), a=a, b=b,
                audience=rng.choice(_AUDIENCES), profession=rng.choice(_PROFESSIONS),
                event=rng.choice(_EVENTS), phrase=rng.choice(_PHRASES),
                langs=rng.choice(_LANG_SETS), genre=rng.choice(_GENRES), character=character,
                performance=performance, process=rng.choice(_PROCESSES),
                procedure=rng.choice(_PROCEDURES), code=rng.choice(_CODE),
                x=rng.randint(12, 99), y=rng.randint(12, 99), z=rng.randint(3, 400),
                lang=rng.choice(_LANGS), sentence=rng.choice(_SENTENCES),
                fact=rng.choice(_FACTS), count=count, place=place)
            if q in seen:
                continue
            seen.add(q)
            made += 1
            rows.append({"id": f"eval-{fi:02d}-{made:02d}", "category": category,
                         "question": q, "suits_sketch": suits, "frame": frame})
    return rows


def main() -> int:
    rows = compose()
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
