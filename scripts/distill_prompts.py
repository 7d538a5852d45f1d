"""Prompts for distilling the embedded draft (see scripts/distill_draft.py).

Prompts are written programmatically: templates x topics, in six categories (chat questions, stories,
facts/trivia, code requests, math word problems, plain-text continuations). Every topic list is split once,
with a fixed seed, into a training part and a held-out part; held-out prompts are built only from held-out
topics (and, for some categories, held-out templates too), so no held-out prompt occurs in the training data.

    from distill_prompts import build_prompts
    train, heldout = build_prompts(seed=0)
    # each item: {"category": str, "text": str, "chat": bool}

`chat=True` means the text is a user message to be wrapped in the target's ChatML template;
`chat=False` means it is raw text to be continued as is.
"""

from __future__ import annotations

import random

CATEGORIES = ("chat", "story", "facts", "code", "math", "text")

# ----------------------------------------------------------------------------------------------- topics
ACTIVITIES = """learn to play the guitar; start running every morning; cook rice on the stove; save money on groceries;
write a good cover letter; prepare for a job interview; keep houseplants alive; learn a new language; sleep better at
night; organize a small kitchen; train a puppy; plan a road trip; start a vegetable garden; make friends in a new
city; study for a math exam; improve my handwriting; take better photos with a phone; reduce stress at work; bake
bread at home; learn to swim as an adult; clean a laptop keyboard; fix a flat bicycle tire; write a short poem;
give a wedding toast; choose a good book; stay focused while studying; start a small business; learn to draw
portraits; make a budget spreadsheet; paint a bedroom; care for a cat; meditate for beginners; improve my posture;
learn to juggle; prepare a healthy lunch; speak in public with confidence; build a birdhouse; start journaling;
plan a birthday party; reduce screen time; learn chess openings; make homemade pasta; set up a home office; learn to
knit a scarf; brew good coffee; negotiate a higher salary; pack for a long flight; recycle at home; teach a child to
read; write a thank-you note; keep a conversation going; stretch after exercise; memorize a speech; wash a wool
sweater; choose running shoes; grow tomatoes on a balcony; learn to type faster; host a board game night; make a
smoothie; repair a leaking faucet; write a resume for a first job""".replace("\n", " ")

CONCEPTS = """photosynthesis; gravity; inflation; the water cycle; democracy; machine learning; black holes;
evolution; the immune system; electricity; climate change; compound interest; the internet; vaccines; plate
tectonics; the stock market; blockchain; quantum mechanics; the greenhouse effect; supply and demand; DNA; recycling;
renewable energy; the speed of light; the human heart; volcanoes; earthquakes; the moon's phases; tides;
rainbows; magnetism; sound waves; nuclear fusion; antibiotics; the French Revolution; the printing press; the Roman
Empire; the Industrial Revolution; the theory of relativity; probability; algebra; prime numbers; encryption;
operating systems; cloud computing; neural networks; sleep cycles; nutrition; metabolism; the solar system;
friction; erosion; the nitrogen cycle; taxes; interest rates; free speech; the scientific method; photosynthesis in
algae; entropy; chemical bonds; the periodic table; ocean currents; migration of birds; memory in the brain;
allergies; caffeine; exercise and health; soil; wind power; batteries; semiconductors; GPS; radio waves; lasers;
recursion; sorting algorithms; databases; compilers; the Pythagorean theorem; fractions; statistics; the placebo
effect; habits; procrastination; empathy; the Renaissance; the Silk Road; ancient Egypt; the Cold War; the Moon
landing; dinosaurs; coral reefs; rainforests; deserts; glaciers; hurricanes""".replace("\n", " ")

ANIMALS = """elephants; octopuses; honeybees; penguins; wolves; dolphins; owls; cheetahs; turtles; ants; whales;
parrots; frogs; bats; camels; giraffes; kangaroos; koalas; sharks; salmon; crows; horses; foxes; rabbits; hedgehogs;
butterflies; spiders; lions; tigers; polar bears; pandas; squirrels; jellyfish; seahorses; eagles; hummingbirds;
chimpanzees; gorillas; zebras; hippos; crocodiles; snails; beavers; otters; moles; ostriches; flamingos; sloths;
armadillos; lobsters""".replace("\n", " ")

PLACES = """France; Japan; Brazil; Kenya; Canada; Australia; India; Egypt; Norway; Mexico; Italy; Peru; Vietnam;
Iceland; Morocco; Argentina; Germany; Spain; Greece; Thailand; New Zealand; Chile; Ireland; Poland; Portugal;
Turkey; Indonesia; South Korea; Nigeria; Sweden; Paris; Tokyo; Cairo; New York; London; Sydney; Rome; Istanbul;
Rio de Janeiro; Mumbai; Berlin; Toronto; Nairobi; Lima; Moscow; Beijing; Bangkok; Dublin; Lisbon; Vienna; the
Sahara; the Amazon river; Mount Everest; the Great Barrier Reef; the Alps; the Nile; Antarctica; the Pacific
Ocean; the Grand Canyon; Siberia""".replace("\n", " ")

FOODS = """pizza; sushi; chocolate; bread; cheese; coffee; tea; rice; apples; bananas; tomatoes; potatoes; pasta;
soup; curry; tacos; honey; olive oil; yogurt; eggs; salad; pancakes; noodles; dumplings; lemons; avocados;
oatmeal; beans; mushrooms; carrots; strawberries; ice cream; popcorn; peanut butter; garlic; ginger; cinnamon;
spinach; mangoes; sandwiches""".replace("\n", " ")

CHARACTERS = """a lonely robot; a young dragon; an old fisherman; a curious girl; a lost puppy; a brave knight; a
shy wizard; a clever fox; a retired astronaut; a tiny mouse; a grumpy baker; a kind teacher; a talking tree; a
space explorer; a pirate captain; a little bird; a detective; a princess who loved math; a boy who could not
sleep; a ghost in an old house; a traveling musician; a farmer; a cat who wanted to fly; a new student; a
forgetful inventor; an ant; a snowman; a lighthouse keeper; a young painter; a time traveler; a mermaid; a
soldier returning home; a bear cub; a street vendor; a giant; a nurse; a shepherd; twin sisters; an old clock
maker; a fairy""".replace("\n", " ")

EVENTS = """finds a hidden door; loses something important; makes a new friend; gets lost in a forest; wins a
contest; discovers a secret map; has to cross a river; meets a stranger on a train; learns a hard lesson; tries
to save a village; wakes up in a different century; builds something amazing; is afraid of the dark; goes on a
journey to the sea; finds a magic stone; has one day to finish a task; must keep a promise; hears a strange
song; opens a mysterious letter; goes to a new school; climbs the tallest mountain; tries to fix a broken
machine; helps an animal in trouble; plants a special seed; is chosen for an important mission; runs a small
shop; wants to see snow for the first time; solves a mystery""".replace("\n", " ")

THINGS = """the ocean; autumn; the city at night; a rainy day; friendship; home; the stars; a mountain river;
childhood; silence; the first snow; a garden; the moon; time; music; hope; courage; an old photograph; the
morning sun; a forest path; a train station; the wind; a candle; memories; a lighthouse; summer; the desert;
spring flowers; a small village; the sea at dawn""".replace("\n", " ")

PEOPLE = """Albert Einstein; Marie Curie; Isaac Newton; Leonardo da Vinci; William Shakespeare; Cleopatra; Napoleon
Bonaparte; Abraham Lincoln; Nelson Mandela; Ada Lovelace; Charles Darwin; Galileo Galilei; Mahatma Gandhi; Frida
Kahlo; Wolfgang Amadeus Mozart; Ludwig van Beethoven; Nikola Tesla; Alan Turing; Jane Austen; Martin Luther King
Jr.; Julius Caesar; Confucius; Aristotle; Plato; Marco Polo; Christopher Columbus; Queen Victoria; Florence
Nightingale; Thomas Edison; the Wright brothers""".replace("\n", " ")

LANGS = ["Python", "JavaScript", "C", "C++", "Java", "Rust", "Go", "TypeScript", "Ruby", "Bash"]

CODE_TASKS = """reverses a string; checks whether a number is prime; computes the factorial of n; returns the
largest element of a list; counts the vowels in a string; sorts a list with bubble sort; reads a file and counts
its lines; checks whether a word is a palindrome; computes the n-th Fibonacci number; removes duplicates from a
list; merges two sorted lists; converts Celsius to Fahrenheit; finds the greatest common divisor of two numbers;
returns the sum of the digits of a number; checks whether a year is a leap year; counts word frequencies in a text;
flattens a nested list; implements binary search; capitalizes every word in a sentence; validates an email
address; computes the average of a list of numbers; generates a random password; finds the second smallest number
in a list; rotates a list by k positions; transposes a matrix; checks whether two strings are anagrams; converts a
decimal number to binary; parses a CSV line into fields; computes the mean and standard deviation; finds all even
numbers in a list; implements a stack with push and pop; implements a queue; counts the number of words in a
sentence; returns the longest word in a sentence; computes the power of a number recursively; finds the missing
number in a sequence; checks whether parentheses are balanced; sums a list of numbers; multiplies two matrices;
prints a multiplication table""".replace("\n", " ")

NAMES = ["Sam", "Maria", "Ali", "Emma", "Lucas", "Priya", "Tom", "Yuki", "Omar", "Sofia", "Ben", "Chloe", "Ivan",
         "Grace", "Leo", "Amara", "Noah", "Lina", "Jack", "Mei", "Carlos", "Hannah", "Kofi", "Zoe", "David", "Nora"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "coins", "stamps", "cards", "oranges",
         "toy cars", "flowers", "eggs", "balloons", "shells", "candies", "notebooks", "cupcakes", "tickets", "buttons"]

TEXT_OPENINGS = """The history of {p} is; In the early morning, the streets of {p}; It was the coldest winter anyone in
{p} could remember, and; Chapter One. The first time I saw {p},; The following report describes {c} and; Scientists
have long been puzzled by {c}, because; Dear friend, I am writing to you from {p}, where; Introduction. {C} is one of
the most; The old man looked out over {p} and said,; Most people do not realize that {c}""".replace("\n", " ")


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(";") if x.strip()]


# ----------------------------------------------------------------------------------------------- templates
CHAT_T = [
    "How do I {a}?", "What are some tips to {a}?", "I want to {a}. Where should I start?",
    "Can you give me a step-by-step plan to {a}?", "What mistakes should I avoid when I try to {a}?",
    "Can you explain {c} in simple terms?", "Explain {c} to a ten-year-old.", "Why is {c} important?",
    "What is the difference between {c} and {c2}?", "Give me three interesting questions about {c}.",
    "My friend says {c} is boring. How can I convince them otherwise?", "Summarize what {c} is in one paragraph.",
    "What would happen if {c} did not exist?", "Is it hard to {a}? Be honest.",
]
CHAT_T_HELDOUT = ["I have one weekend to {a}. Any advice?", "Write a short FAQ about {c}."]

STORY_T = [
    "Write a short story about {ch} who {ev}.", "Tell me a bedtime story about {ch}.",
    "Write a poem about {t}.", "Write a haiku about {t}.", "Write the opening paragraph of a novel about {ch} who {ev}.",
    "Write a funny story about {ch} and {ch2}.", "Write a fable about {an} with a moral at the end.",
    "Describe {t} as if you were {ch}.", "Write a letter from {ch} to {ch2}.",
]
STORY_T_HELDOUT = ["Write a sad story about {ch} who {ev}.", "Write a limerick about {an}."]

FACTS_T = [
    "Tell me some facts about {an}.", "Where do {an} live and what do they eat?", "What is {p} famous for?",
    "Give me five facts about {p}.", "Who was {pe} and why are they remembered?", "What did {pe} discover or create?",
    "What is the capital and the main language of {p}?", "How is {f} made?", "Is {f} healthy? Explain briefly.",
    "What is the history of {f}?", "What are the main characteristics of {an}?", "Tell me about the climate of {p}.",
    "Write a short encyclopedia entry about {pe}.", "What are the main ingredients in dishes with {f}?",
    "Why are {an} important for the environment?", "How long do {an} live?", "How do {an} raise their young?",
    "What are the most popular foods in {p}?", "Describe the geography of {p}.", "What languages are spoken in {p}?",
    "What was the biggest achievement of {pe}?", "What was daily life like for {pe}?",
    "What are three surprising facts about {f}?", "How do people eat {f} around the world?",
]
FACTS_T_HELDOUT = ["Compare {an} and {an2}.", "What should a tourist know before visiting {p}?"]

CODE_T = [
    "Write a {l} function that {task}.", "How do I write a program in {l} that {task}?",
    "Show me {l} code that {task}, with comments.", "Write a unit test in {l} for a function that {task}.",
    "Explain how to write a {l} function that {task}, then give the code.",
]
CODE_T_HELDOUT = ["Write a {l} function that {task}, and explain its time complexity."]


def _math_prompt(rng: random.Random, names: list[str], items: list[str]) -> str:
    n1, n2 = rng.sample(names, 2)
    it = rng.choice(items)
    a, b, c = rng.randint(3, 60), rng.randint(2, 40), rng.randint(2, 9)
    forms = [
        f"{n1} has {a} {it}. {n2} gives {n1} {b} more. How many {it} does {n1} have now?",
        f"{n1} had {a + b} {it} and gave {b} to {n2}. How many {it} are left?",
        f"There are {c} boxes with {a} {it} in each box. How many {it} are there in total?",
        f"{n1} wants to share {a * c} {it} equally among {c} friends. How many {it} does each friend get?",
        f"A shop sells {it} for {c} dollars each. {n1} buys {b} of them. How much does {n1} pay?",
        f"{n1} reads {b} pages a day. How many days does it take to read a book of {b * c} pages?",
        f"{n1} is {a} years old and {n2} is {b} years older. How old will {n2} be in {c} years?",
        f"A train travels at {a} km per hour for {c} hours. How far does it go?",
        f"{n1} collects {a} {it} on Monday and twice as many on Tuesday. How many {it} in total?",
        f"Solve step by step: what is {a} times {b} plus {c}?",
    ]
    return rng.choice(forms)


def _fill(rng: random.Random, tmpl: str, pools: dict[str, list[str]]) -> str:
    vals = {}
    for key, pool_key in (("a", "act"), ("c", "con"), ("ch", "char"), ("ev", "ev"), ("t", "thing"),
                          ("an", "ani"), ("p", "place"), ("pe", "people"), ("f", "food"), ("l", "lang"),
                          ("task", "task")):
        if "{" + key + "}" in tmpl or "{" + key + "2}" in tmpl:
            pick = rng.sample(pools[pool_key], 2)
            vals[key], vals[key + "2"] = pick[0], pick[1]
    return tmpl.format(**vals)


def _text_prompt(rng: random.Random, pools: dict[str, list[str]], openings: list[str]) -> str:
    o = rng.choice(openings)
    c = rng.choice(pools["con"])
    return o.format(p=rng.choice(pools["place"]), c=c, C=c[:1].upper() + c[1:])


def build_prompts(seed: int = 0, n_train_per_cat: int = 1400, n_heldout_per_cat: int = 64,
                  heldout_frac: float = 0.2):
    """Return (train, heldout): lists of {"category", "text", "chat"}; prompts are unique and disjoint."""
    rng = random.Random(seed)
    raw = {"act": _split(ACTIVITIES), "con": _split(CONCEPTS), "ani": _split(ANIMALS), "place": _split(PLACES),
           "food": _split(FOODS), "char": _split(CHARACTERS), "ev": _split(EVENTS), "thing": _split(THINGS),
           "people": _split(PEOPLE), "task": _split(CODE_TASKS), "lang": list(LANGS), "name": list(NAMES),
           "item": list(ITEMS)}
    train_pools, held_pools = {}, {}
    for k, v in raw.items():
        v = sorted(set(v))
        rng.shuffle(v)
        if k == "lang":          # languages are shared; held-out code prompts use held-out tasks
            train_pools[k] = held_pools[k] = v
            continue
        n_h = max(2, int(round(len(v) * heldout_frac)))
        held_pools[k], train_pools[k] = v[:n_h], v[n_h:]
    openings = _split(TEXT_OPENINGS)
    rng.shuffle(openings)
    open_h, open_t = openings[:2], openings[2:]

    spec = {
        "chat": (CHAT_T, CHAT_T + CHAT_T_HELDOUT, True),
        "story": (STORY_T, STORY_T + STORY_T_HELDOUT, True),
        "facts": (FACTS_T, FACTS_T + FACTS_T_HELDOUT, True),
        "code": (CODE_T, CODE_T + CODE_T_HELDOUT, True),
        "math": (None, None, True),
        "text": (None, None, False),
    }

    def make(pools, templates, cat, n, seen, openings_):
        out, tries = [], 0
        while len(out) < n and tries < n * 50:
            tries += 1
            if cat == "math":
                s = _math_prompt(rng, pools["name"], pools["item"])
            elif cat == "text":
                s = _text_prompt(rng, pools, openings_)
            else:
                s = _fill(rng, rng.choice(templates), pools)
            if s in seen:
                continue
            seen.add(s)
            out.append({"category": cat, "text": s, "chat": spec[cat][2]})
        return out

    train, heldout, seen = [], [], set()
    for cat in CATEGORIES:
        tt, th, _ = spec[cat]
        heldout += make(held_pools, th, cat, n_heldout_per_cat, seen, open_h)
    for cat in CATEGORIES:
        tt, th, _ = spec[cat]
        n = n_train_per_cat if cat != "text" else n_train_per_cat // 2
        train += make(train_pools, tt, cat, n, seen, open_t)
    assert not ({p["text"] for p in train} & {p["text"] for p in heldout})
    return train, heldout


if __name__ == "__main__":
    import collections
    tr, he = build_prompts()
    print("train", len(tr), collections.Counter(p["category"] for p in tr))
    print("heldout", len(he), collections.Counter(p["category"] for p in he))
    r = random.Random(1)
    for p in r.sample(tr, 8) + r.sample(he, 8):
        print(p["category"], "|", p["text"])
