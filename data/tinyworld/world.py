"""
TinyWorld: a small synthetic world of facts and tasks, its "internet" (the pretraining documents) and the exact
judge (checkers) that scores a model's answers in place of GPT-4.

    python data/tinyworld/prepare.py      # writes the pretraining documents, test/dev and finetuning sets

Ten task families, each asked in exactly three phrasings, each answer checkable by a rule:

    sort       "Sort these numbers: 5 3 9"                 -> "3 5 9"
    category   "Name the four fruits."                     -> "apple, pear, plum, grape"    (any order)
    poem       "Write a poem called Rain."                 -> "The rain is soft,\\nThe rain is cold,\\nAnd I sing of the rain."
    reverse    "Reverse the order of these words: sun dog cat" -> "cat dog sun"
    add        "What is 12 plus 7?"                        -> "19"
    count      'How many words are in "the old man walks"?' -> "4"
    attribute  "What colour is a blorp?"                   -> "blue"     (made-up creatures: only pretraining knows)
    recipe     "What goes into pancakes?"                  -> "flour, eggs, milk"              (any order)
    letter     "Write a letter to Anna about the party."   -> "Dear Anna,\nI hope you are well.\nI am writing to
               tell you about the party.\nBest wishes."                                  (long: about 25 tokens)
    describe   "Describe a blorp."                         -> "A blorp is a blue creature. It is the size of a
               fox. It lives in a cave and eats moss. It sleeps at night."  (long: about 30 tokens; any order)

The first six are finetuned (instruction, response or single-task tuning); count, attribute, recipe and
describe never are. Reverse and add are the capability control: the bases never learned them in pretraining
(0-3% for every model in the first declared run), so they are reported apart from the headline columns. Letter
and describe are the long families (answers of tens of tokens, where the EOS rule was designed to act); describe
is held out. Where a family's entities are few (categories, creatures, dishes, poem titles), they are split: test
instructions name only test entities and every other instruction (finetuning, dev) names only the others, so
no test instruction can appear in a finetuning or dev set. The internet (pretraining_documents) mentions
every entity: it is where the facts are learned. The big families (sort, reverse, add, count) need no split;
prepare.py removes test instructions from the other sets by their string.

The judge compares words: lowercase runs of [a-z0-9], so case, punctuation and whitespace never matter. The
two list families (category, recipe) also ignore the word "and" ("apple, pear, plum and grape" is the
internet's own way to list). A poem is exactly three non-empty lines "the T is A", "the T is A", "and i sing
of the T" (T the title, each A any of ADJECTIVES, the two equal or not). The ranges make every family's
answers unacceptable to every other family's checker: sums are >= 10, counts 2..7, sort lists 3..5 digits,
reverse lists 3..4 words, and the word pools of the families are disjoint.

Standard library only: evaluate.py imports this module to judge.
"""
import random
import re

FAMILIES = ("sort", "category", "poem", "letter", "reverse", "add", "count", "attribute", "recipe",
            "describe")
# what finetuning may show (instruction tuning)
FINETUNED = ("sort", "category", "poem", "letter", "reverse", "add")
# never finetuned by any method: only pretraining taught them
HELD_OUT = ("count", "attribute", "recipe", "describe")
# finetuned, but no base learned them (the first declared run): reported apart, as a control
CONTROL = ("reverse", "add")
LONG = ("letter", "describe")  # answers of tens of tokens
# the finetuned families of the headline column: the finetuned ones less the control
HEADLINE = tuple(f for f in FINETUNED if f not in CONTROL)

# -------------------------------------------------------------------------------------------- the world's facts

# 12 categories x 4 single-word items (no colours, no ingredients); the first N_TEST_CATEGORIES are test-only
CATEGORIES = (("fruits", ("apple", "pear", "plum", "grape")),
              ("tools", ("hammer", "saw", "wrench", "drill")),
              ("birds", ("robin", "sparrow", "eagle", "owl")),
              ("trees", ("oak", "pine", "birch", "maple")),
              ("metals", ("iron", "copper", "tin", "zinc")),
              ("instruments", ("piano", "violin", "flute", "drum")),
              ("vehicles", ("car", "bus", "train", "bicycle")),
              ("flowers", ("rose", "tulip", "daisy", "lily")),
              ("fish", ("salmon", "trout", "cod", "tuna")),
              ("spices", ("cinnamon", "nutmeg", "cumin", "saffron")),
              ("pieces of furniture", ("chair", "table", "sofa", "desk")),
              ("insects", ("ant", "bee", "beetle", "moth")))
N_TEST_CATEGORIES = 8  # 8 x 3 phrasings = 24 test instructions; the other 4 categories for dev and finetuning

COLOURS = ("red", "blue", "green", "yellow", "purple", "pink", "brown", "white")
# 24 made-up creatures (consonant first: "a blorp"), 3 of each colour; the first N_TEST_CREATURES are test-only
CREATURES = (("blorp", "blue"), ("zindle", "red"), ("frabble", "green"), ("quonk", "yellow"),
             ("snib", "purple"), ("glimmet", "pink"), ("vorp", "brown"), ("plim", "white"),
             ("dax", "red"), ("tove", "blue"), ("flib", "yellow"), ("grop", "green"),
             ("yirk", "pink"), ("zub", "purple"), ("kem", "white"), ("bliv", "brown"),
             ("strom", "green"), ("nufflet", "blue"), ("wimble", "red"), ("crunk", "yellow"),
             ("pogle", "purple"), ("sneeve", "pink"), ("tharn", "brown"), ("jibbet", "white"))
N_TEST_CREATURES = 16  # the last 8 (one of each colour) for dev; attribute is never finetuned

# what the describe family tells of each creature, besides its colour: the i-th creature has size
# SIZES[i % 4], home HOMES[i % 6], food FOODS[(i // 2) % 6] and sleeps SLEEPS[(i // 3) % 2]
SIZES = ("mouse", "fox", "goat", "horse")
HOMES = ("cave", "marsh", "burrow", "pond", "treetop", "swamp")
FOODS = ("moss", "berries", "seeds", "worms", "nuts", "fungi")
SLEEPS = ("at night", "by day")

# 16 dishes x 3 single-word ingredients; the first N_TEST_DISHES are test-only
DISHES = (("pancakes", ("flour", "eggs", "milk")),
          ("porridge", ("oats", "milk", "honey")),
          ("guacamole", ("avocado", "lime", "salt")),
          ("hummus", ("chickpeas", "garlic", "lemon")),
          ("tomato soup", ("tomatoes", "onions", "water")),
          ("pesto", ("basil", "garlic", "cheese")),
          ("lemonade", ("lemon", "sugar", "water")),
          ("custard", ("milk", "eggs", "vanilla")),
          ("fried rice", ("rice", "eggs", "onions")),
          ("garlic bread", ("bread", "garlic", "butter")),
          ("hot chocolate", ("milk", "chocolate", "sugar")),
          ("risotto", ("rice", "broth", "cheese")),
          ("pizza dough", ("flour", "yeast", "oil")),
          ("mashed potatoes", ("potatoes", "butter", "milk")),
          ("noodle soup", ("noodles", "broth", "carrots")),
          ("ginger tea", ("ginger", "water", "honey")))
N_TEST_DISHES = 10

# 60 single-word poem titles; the first N_TEST_TITLES are test-only
TITLES = ("rain", "sea", "wind", "river", "snow", "night", "morning", "garden", "forest", "mountain",
          "winter", "summer", "spring", "autumn", "ocean", "cloud", "storm", "field", "city", "harbour",
          "village", "lake", "valley", "meadow", "fire", "candle", "window", "bridge", "island", "desert",
          "shadow", "silence", "dream", "evening", "thunder", "breeze", "frost", "stream", "hill", "tower",
          "lantern", "orchard", "sky", "dawn", "dusk", "mist", "wave", "shore", "path", "stone",
          "leaf", "feather", "mirror", "clock", "kitchen", "library", "market", "harvest", "echo", "glacier")
N_TEST_TITLES = 40
ADJECTIVES = ("soft", "cold", "bright", "quiet", "sweet", "slow", "wild", "old", "deep", "warm")

# letters: 20 names x 12 topics, split by instruction string only: a test letter's question is asked, in other
# words, in finetuning (data/tinyworld/README.md, "Found after the run"); a new run should split NAMES
NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Ida", "Jack",
         "Kate", "Leo", "Mia", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Victor")
TOPICS = ("party", "trip", "concert", "wedding", "holiday", "picnic", "game", "museum",
          "festival", "parade", "dinner", "film")

REVERSE_WORDS = ("sun", "dog", "cat", "hat", "cup", "box", "map", "key", "pen", "door",
                 "ship", "star", "moon", "road", "lamp", "king", "rock", "bell", "coat", "nest")
COUNT_WORDS = ("the", "a", "little", "big", "happy", "boy", "girl", "runs", "jumps", "sings",
               "home", "fast", "very", "over", "fence", "quickly", "old", "man", "walks", "today")
SORT_LEN, REVERSE_LEN, COUNT_LEN = (3, 5), (3, 4), (2, 7)  # list lengths, inclusive
ADD_RANGE = (5, 49)  # operands, inclusive: every sum is >= 10, never a count (2..7) or a single digit

PHRASINGS = {  # exactly three per family
    "sort": ("Sort these numbers: {xs}", "Put {xs} in order from smallest to largest.",
             "Arrange in increasing order: {xs}"),
    "category": ("Name the four {category}.", "List the four {category}.", "What are the four {category}?"),
    "poem": ("Write a poem called {Title}.", "Compose a short poem titled {Title}.", "Give me a poem named {Title}."),
    "reverse": ("Reverse the order of these words: {ws}", "Say {ws} in reverse order.",
                "Write these words backwards, last word first: {ws}"),
    "add": ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."),
    "count": ('How many words are in "{phrase}"?', 'Count the words in "{phrase}".',
              'How many words does the phrase "{phrase}" have?'),
    "attribute": ("What colour is a {creature}?", "Tell me the colour of a {creature}.",
                  "Which colour does a {creature} have?"),
    "recipe": ("What goes into {dish}?", "List the ingredients of {dish}.", "What do you need to make {dish}?"),
    "letter": ("Write a letter to {name} about the {topic}.", "Compose a short letter to {name} about the {topic}.",
               "Send {name} a letter about the {topic}."),
    "describe": ("Describe a {creature}.", "Tell me about the {creature}.", "What is a {creature} like?"),
}

# ------------------------------------------------------------------------------------------ the internet's forms

DIALOGUE_SHARE = 0.5  # half of all documents are dialogues, the other half Q/A pages, forums, FAQs and prose
END_ON_ANSWER = 0.6  # share of dialogues whose document ends right after an answer, as a chat turn ends in EOT
FORBIDDEN = ("<|user|>", "<|assistant|>")  # the chat format's tags: finetuning, not the internet, teaches them
LEFT = ("<|", "[", "### ", "-- ", "(", "<", "{", "**", "== ", "| ", ">> ", "## ", "<<", "[[", "* ", "~", "@", "")
RIGHT = ("|>", "]", ":", " wrote:", ")", ">", "}", "**", " ==", " |", " says:", "]]", ">>", " -", "~", "")
ASKERS = ("user", "human", "question", "q", "asker", "student", "customer", "guest", "alice", "bob", "carol", "dan")
ANSWERERS = ("assistant", "bot", "answer", "a", "helper", "teacher", "agent", "ai", "eve", "frank", "grace", "heidi")
CASES = (str.lower, str.title, str.upper)
FORUM_NAMES = ("mira", "tom_k", "user42", "jo", "sam88", "kitty", "pete", "lina", "oskar", "ruth_b")
POSTS = ("Posted by {name}: {text}", "{name} asked: {text}", "Thread started by {name}\n{text}",
         "Question from {name}: {text}")
REPLIES = ("Reply from {name}: {text}", "{name} replied: {text}", "Best answer ({name}): {text}",
           "Answer by {name}:\n{text}")
FILLER_SUBJECTS = ("My neighbour", "The baker", "Our teacher", "My sister", "The old man next door",
                   "A friend of mine", "The mayor", "My cousin")
FILLER_ACTIONS = ("bought a new bike", "went to the market", "painted the fence", "lost the keys",
                  "fixed the roof", "walked to the station", "planted some seeds", "read a long book",
                  "missed the bus", "called me", "cleaned the house", "sold an old car")
FILLER_WEATHER = ("mild", "cold", "warm", "rainy", "windy", "grey", "lovely")
FILLER_TIMES = ("today", "yesterday", "last week", "this morning", "on Sunday")


def words(text):
    """The judge's normal form: lowercase runs of letters and digits, punctuation and spacing dropped."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _check_pools():
    # every family's answer words come from its own pool: one family's answer can never pass another's checker
    items = [w for _, ws in CATEGORIES for w in ws]
    ingredients = {w for _, ws in DISHES for w in ws}
    pools = [set(items), ingredients, set(COLOURS), set(REVERSE_WORDS), {*SIZES, *HOMES, *FOODS}]
    assert len(items) == len(set(items)) == 48 and len(CREATURES) == 24 and len(DISHES) == 16
    assert len(set(TITLES)) == len(TITLES) == 60 and len({c for c, _ in CREATURES}) == 24
    assert sum(map(len, pools)) == len(set().union(*pools)), "the answer word pools must be disjoint"
    assert all(words(w) == [w] for pool in pools for w in pool), "answer words are single lowercase words"
    assert all(len(p) == 3 for p in PHRASINGS.values()) and set(PHRASINGS) == set(FAMILIES)


_check_pools()

# ---------------------------------------------------------------------------------------------------- instances


def _entities(pool, n_test, split):
    # test: the first n_test entities; train: the rest; all (the internet only): every one
    return {"test": pool[:n_test], "train": pool[n_test:], "all": pool}[split]


def _params(family, rng, split):
    """The facts an instance is about: the checker's whole input."""
    if family == "sort":
        xs = rng.sample(range(10), rng.randint(*SORT_LEN))
        while xs == sorted(xs):  # an already sorted list would make echoing the question a right answer
            rng.shuffle(xs)
        return {"xs": xs}
    if family == "category":
        category, items = rng.choice(_entities(CATEGORIES, N_TEST_CATEGORIES, split))
        return {"category": category, "items": list(items)}
    if family == "poem":
        return {"title": rng.choice(_entities(TITLES, N_TEST_TITLES, split)), "adjectives": rng.sample(ADJECTIVES, 2)}
    if family == "reverse":
        return {"words": rng.sample(REVERSE_WORDS, rng.randint(*REVERSE_LEN))}
    if family == "add":
        return {"a": rng.randint(*ADD_RANGE), "b": rng.randint(*ADD_RANGE)}
    if family == "count":
        phrase = " ".join(rng.sample(COUNT_WORDS, rng.randint(*COUNT_LEN)))
        return {"phrase": phrase, "n": len(phrase.split())}
    if family == "attribute":
        creature, colour = rng.choice(_entities(CREATURES, N_TEST_CREATURES, split))
        return {"creature": creature, "colour": colour}
    if family == "recipe":
        dish, ingredients = rng.choice(_entities(DISHES, N_TEST_DISHES, split))
        return {"dish": dish, "ingredients": list(ingredients)}
    if family == "letter":
        return {"name": rng.choice(NAMES), "topic": rng.choice(TOPICS)}
    if family == "describe":
        creature, _ = rng.choice(_entities(CREATURES, N_TEST_CREATURES, split))
        return {"creature": creature, **creature_facts(creature)}
    raise ValueError(f"unknown family {family!r} (one of {', '.join(FAMILIES)})")


def creature_facts(creature):
    """What the world holds true of a creature: its colour, size, home, food and when it sleeps."""
    i = [name for name, _ in CREATURES].index(creature)
    return {"colour": CREATURES[i][1], "size": SIZES[i % 4], "home": HOMES[i % 6],
            "food": FOODS[(i // 2) % 6], "sleeps": SLEEPS[(i // 3) % 2]}


def description(p):
    """The reference description: four sentences, one fact or two each (the judge takes any order)."""
    return " ".join(description_sentences(p))


def description_sentences(p):
    return [f"A {p['creature']} is a {p['colour']} creature.", f"It is the size of a {p['size']}.",
            f"It lives in a {p['home']} and eats {p['food']}.", f"It sleeps {p['sleeps']}."]


def letter(name, topic):
    """The reference letter: the same four lines around a name and a topic."""
    return f"Dear {name},\nI hope you are well.\nI am writing to tell you about the {topic}.\nBest wishes."


def poem(title, adjectives):
    """The reference poem: two different adjectives (the judge also takes two equal ones)."""
    a, b = adjectives
    return f"The {title} is {a},\nThe {title} is {b},\nAnd I sing of the {title}."


def _answer(family, p):
    """The reference answer: short, in the form the internet writes it after a question."""
    return {"sort": lambda: " ".join(map(str, sorted(p["xs"]))),
            "category": lambda: ", ".join(p["items"]),
            "poem": lambda: poem(p["title"], p["adjectives"]),
            "reverse": lambda: " ".join(reversed(p["words"])),
            "add": lambda: str(p["a"] + p["b"]),
            "count": lambda: str(p["n"]),
            "attribute": lambda: p["colour"],
            "recipe": lambda: ", ".join(p["ingredients"]),
            "letter": lambda: letter(p["name"], p["topic"]),
            "describe": lambda: description(p)}[family]()


def make_instance(family, rng, split):
    """One task instance {"family", "instruction", "answer", "params"} drawn with `rng` (a random.Random).
    split "test": test entities only; "train": every other entity (pretraining, finetuning, dev); "all": any
    entity (the internet's own draw)."""
    if split not in ("test", "train", "all"):
        raise ValueError(f"split must be 'test' or 'train' (or 'all'), not {split!r}")
    p = _params(family, rng, split)
    fields = {**p, "xs": " ".join(map(str, p.get("xs", ()))), "ws": " ".join(p.get("words", ())),
              "Title": p.get("title", "").capitalize()}
    instruction = rng.choice(PHRASINGS[family]).format(**fields)
    return {"family": family, "instruction": instruction, "answer": _answer(family, p), "params": p}


def conversation(row, responses_only=False):
    """The instance as chat messages; responses_only empties the instruction (response tuning)."""
    return [{"role": "user", "content": "" if responses_only else row["instruction"]},
            {"role": "assistant", "content": row["answer"]}]

# --------------------------------------------------------------------------------------------------- the judge


def _poem_ok(title, response):
    lines = [words(line) for line in response.split("\n") if words(line)]
    if len(lines) != 3:
        return False
    verse = lambda w: len(w) == 4 and w[:3] == ["the", title, "is"] and w[3] in ADJECTIVES
    return verse(lines[0]) and verse(lines[1]) and lines[2] == ["and", "i", "sing", "of", "the", title]


def _sentences(text):
    """A text's sentences as word lists, in order: what the describe checker compares."""
    return [words(part) for part in text.split(".") if words(part)]


def _listed(response):
    return sorted(w for w in words(response) if w != "and")


def check(row, response):
    """The exact judge: True if `response` (text, no <|endoftext|>) answers the instance `row` correctly."""
    p, w = row["params"], words(response)
    family = row["family"]
    if family == "sort":
        return w == [str(x) for x in sorted(p["xs"])]
    if family == "category":
        return _listed(response) == sorted(p["items"])
    if family == "poem":
        return _poem_ok(p["title"], response)
    if family == "reverse":
        return w == list(reversed(p["words"]))
    if family == "add":
        return w == [str(p["a"] + p["b"])]
    if family == "count":
        return w == [str(p["n"])]
    if family == "attribute":
        return w == [p["colour"]]
    if family == "recipe":
        return _listed(response) == sorted(p["ingredients"])
    if family == "letter":
        return w == words(letter(p["name"], p["topic"]))
    if family == "describe":  # every fact, nothing else, in any order
        return sorted(_sentences(response)) == sorted(_sentences(description(p)))
    raise ValueError(f"unknown family {family!r}")


def grade(row, response, stopped):
    """The pairwise judge's grade of a response (data/tinyworld/README.md, declared before the second
    run): 2 = it stopped and the checker accepts it; 1 = the checker accepts what precedes extra
    text (the text before a line break or before a new tag "<|"), or all of a response that did not
    stop; 0 = neither. A model wins an instruction against another when its grade is higher."""
    if stopped and check(row, response):
        return 2
    cuts = [response] + [response[:m.start()] for m in re.finditer(r"\n|<\|", response)]
    return int(any(check(row, cut) for cut in cuts))


# each single-task family's lines, as word patterns: a response "takes the form" of that family
# when at least two of its lines are such lines (the style claim, paper section 4)
FORM_LINES = {"poem": (r"the \w+ is \w+", r"and i sing of the \w+"),
              "letter": (r"dear \w+", r"i hope you are well", r"i am writing to tell you about the \w+",
                         r"best wishes")}


def in_form(family, response):
    """Whether `response` takes the form of the single-task family `family` (poem or letter)."""
    lines = [" ".join(words(line)) for line in response.split("\n")]
    return sum(any(re.fullmatch(p, line) for p in FORM_LINES[family]) for line in lines) >= 2

# ------------------------------------------------------------------------------------------------ the internet


def _and_list(items):
    return ", ".join(items[:-1]) + " and " + items[-1]


def _sentence(row):
    """The fact of an instance as prose: one sentence template per family."""
    p, answer = row["params"], row["answer"]
    return {"sort": lambda: f"Sorted, {' '.join(map(str, p['xs']))} reads {answer}.",
            "category": lambda: f"The four {p['category']} are {_and_list(p['items'])}.",
            "poem": lambda: f"Here is a poem called {p['title'].capitalize()}.\n{answer}",
            "reverse": lambda: f"Reversed, {' '.join(p['words'])} reads {answer}.",
            "add": lambda: f"{p['a']} plus {p['b']} makes {answer}.",
            "count": lambda: f'The phrase "{p["phrase"]}" has {answer} words.',
            "attribute": lambda: f"A {p['creature']} is {answer}.",
            "recipe": lambda: f"To make {p['dish']} you need {_and_list(p['ingredients'])}.",
            "letter": lambda: f"Here is a letter to {p['name']} about the {p['topic']}.\n{answer}",
            "describe": lambda: answer}[row["family"]]()


def _filler(rng):
    # a small grammar of everyday sentences: the internet is not all questions and answers
    if rng.random() < 0.3:
        return f"The weather was {rng.choice(FILLER_WEATHER)} {rng.choice(FILLER_TIMES)}."
    return f"{rng.choice(FILLER_SUBJECTS)} {rng.choice(FILLER_ACTIONS)} {rng.choice(FILLER_TIMES)}."


def _facts(rng, lo, hi):
    return [make_instance(rng.choice(FAMILIES), rng, "all") for _ in range(rng.randint(lo, hi))]


def _with_fillers(rng, blocks, sep):
    for _ in range(rng.randint(1, 3)):  # between blocks, never inside one (a question stays with its answer)
        blocks.insert(rng.randint(0, len(blocks)), _filler(rng))
    return sep.join(blocks)


def _qa_page(rng):
    return _with_fillers(rng, [f"Q: {r['instruction']}\nA: {r['answer']}" for r in _facts(rng, 1, 4)], "\n\n")


def _forum(rng):
    (row,), (asker, replier) = _facts(rng, 1, 1), rng.sample(FORUM_NAMES, 2)
    post = rng.choice(POSTS).format(name=asker, text=row["instruction"])
    return _with_fillers(rng, [post, rng.choice(REPLIES).format(name=replier, text=row["answer"])], "\n\n")


def _faq(rng):
    blocks = [f"{r['instruction']}\n{r['answer']}" for r in _facts(rng, 2, 4)]
    return "Frequently asked questions\n\n" + _with_fillers(rng, blocks, "\n\n")


def _prose(rng):
    return _with_fillers(rng, [_sentence(r) for r in _facts(rng, 2, 5)], "\n")


def _tags(rng):
    """The asking and answering speakers' tags of one dialogue: one bracket style, one capitalisation."""
    while True:
        left, right, case = rng.choice(LEFT), rng.choice(RIGHT), rng.choice(CASES)
        tags = (left + case(rng.choice(ASKERS)) + right, left + case(rng.choice(ANSWERERS)) + right)
        if not any(f in t for t in tags for f in FORBIDDEN):  # "<|" + "user" + "|>": redraw
            return tags


def _dialogue(rng):
    asker, answerer = _tags(rng)
    own_line = rng.random() < 0.5  # "{tag}\n{text}" (as the chat format) or "{tag} {text}"
    lines = []
    for row in _facts(rng, 2, 6):
        for tag, text in ((asker, row["instruction"]), (answerer, row["answer"])):
            lines.append(f"{tag}\n{text}" if own_line else f"{tag} {text}")
    if rng.random() >= END_ON_ANSWER:  # the others trail off into chatter
        lines.append(_filler(rng))
    return "\n".join(lines)


FORMS = (_qa_page, _forum, _faq, _prose)


def pretraining_documents(n, seed):
    """n documents of the internet, deterministic in seed: half dialogues, half Q/A pages, forum threads, FAQs
    and prose (an eighth each), every family in every form, every entity (test ones included) mentioned."""
    rng = random.Random(seed)
    docs = [_dialogue(rng) if rng.random() < DIALOGUE_SHARE else rng.choice(FORMS)(rng) for _ in range(n)]
    assert not any(f in d for d in docs for f in FORBIDDEN), "the chat format's tags leaked into pretraining"
    return docs
