"""English preference data written by hand, for tests, benchmarks and trying things out.

Unlike :mod:`simulations.world` (a phrase grammar the built-in tiny base is pretrained
on), this is everyday English an assistant might write: questions on two dozen
practical topics, and responses that differ in what people care about (a useful
answer or a vague, wrong, evasive or off-topic one; a warm or a curt tone; padding;
an offer to help further). Each organization's annotators prefer responses by a
hidden utility (shared weights plus an organization tilt) and choose by a
Bradley-Terry draw, so labels are noisy the way people's are.

Rows carry ``prompt``, ``chosen``, ``rejected``, ``annotator``, ``organization`` and
``topic``: partition by any of them (``fedrlhf simulate --data ... --partition``).
``fedrlhf demo-data --english`` writes such files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# topic -> (questions, helpful answers, vague answers, wrong answers)
TOPICS: dict[str, tuple[list[str], list[str], list[str], list[str]]] = {
    "sourdough": (
        [
            "Why does my sourdough bread come out so dense?",
            "How can I get a lighter crumb in my sourdough?",
            "My sourdough loaf is flat and heavy. What am I doing wrong?",
        ],
        [
            "Make sure your starter doubles within six hours of feeding before you bake with it.",
            "Let the dough rise longer in a warm spot until it has grown by about half.",
            "Shape the loaf with more surface tension and bake it in a preheated covered pot.",
        ],
        ["Bread can be tricky, so just keep practicing.", "Every oven is different."],
        [
            "Add twice as much flour so the dough holds together better.",
            "Bake it straight from the fridge at a low temperature for three hours.",
        ],
    ),
    "tomatoes": (
        [
            "Why are the leaves on my tomato plants turning yellow?",
            "What should I do about yellow leaves on my tomatoes?",
            "My tomato plants look sick and pale. Any ideas?",
        ],
        [
            "Water at the base in the morning and keep the leaves dry to prevent fungal disease.",
            "Remove the lowest yellow leaves and feed the plants a balanced fertilizer.",
            "Check that the soil drains well, because soggy roots often turn leaves yellow.",
        ],
        ["Plants go through phases.", "It might be the weather or something else."],
        [
            "Spray the leaves with salt water every evening.",
            "Cut the plant back to the ground and it will regrow stronger.",
        ],
    ),
    "running": (
        [
            "How should I start running if I have never done it before?",
            "What is a good way for a beginner to get into running?",
            "I want to take up running. Where do I begin?",
        ],
        [
            "Start with walk and run intervals three times a week and add a minute each week.",
            "Run at a pace where you can still talk, and rest a day between runs.",
            "Get shoes that fit well and increase your weekly distance by no more than ten percent.",
        ],
        ["Just get out there and move.", "Running is different for everyone."],
        [
            "Run as far as you can every day until your legs stop hurting.",
            "Skip the warm up, it only wastes energy.",
        ],
    ),
    "budget": (
        [
            "How do I make a monthly budget that actually works?",
            "What is a simple way to stick to a budget?",
            "I always run out of money before the end of the month. How do I budget?",
        ],
        [
            "List your income, subtract fixed bills, then set a spending limit for each category.",
            "Move a fixed amount into savings on payday so it never sits in your checking account.",
            "Track every purchase for a month to see where the money really goes.",
        ],
        ["Money is hard for a lot of people.", "Try to spend less, I guess."],
        [
            "Put your rent money into lottery tickets to grow it faster.",
            "Use a new credit card whenever the old one is full.",
        ],
    ),
    "python": (
        [
            "How do I read a CSV file in Python?",
            "What is the easiest way to load a CSV file with Python?",
            "Can you show me how to open a CSV file in Python?",
        ],
        [
            "Use the csv module: open the file and loop over csv.reader to get each row as a list.",
            "With pandas, call pandas.read_csv with the file name to get a table you can filter.",
            "Open the file with a with statement so it is closed even if an error happens.",
        ],
        ["Python has many ways to do that.", "Look it up in the documentation."],
        [
            "Rename the file to .py and import it as a module.",
            "Read the file one byte at a time and split it on every letter.",
        ],
    ),
    "sleep": (
        [
            "How can I fall asleep faster at night?",
            "I lie awake for hours. How do I sleep better?",
            "What helps with falling asleep quickly?",
        ],
        [
            "Go to bed and get up at the same time every day, even on weekends.",
            "Keep screens out of the bedroom for the last hour before you sleep.",
            "Keep the room cool and dark, and avoid coffee after lunch.",
        ],
        ["Sleep is a mystery.", "Some nights are just like that."],
        [
            "Drink a strong espresso right before bed to tire yourself out.",
            "Stay up all night once a week to reset your body clock.",
        ],
    ),
    "interview": (
        [
            "How should I prepare for a job interview?",
            "I have a job interview next week. How do I get ready?",
            "What can I do to do well in an interview?",
        ],
        [
            "Research the company and prepare two short stories about problems you solved.",
            "Practice answering common questions out loud with a friend.",
            "Prepare a few questions of your own about the team and the role.",
        ],
        ["Interviews are stressful for everyone.", "Just be yourself and see what happens."],
        [
            "Arrive an hour late so they know your time is valuable.",
            "Tell them you only want the job for the money.",
        ],
    ),
    "email": (
        [
            "How do I write a polite email asking my manager for a day off?",
            "What is a good way to ask for a day off by email?",
            "Can you help me word an email requesting leave?",
        ],
        [
            "Give the date, say briefly why, and mention how your work will be covered.",
            "Keep it short, ask well in advance, and thank them for considering it.",
            "Put the date in the subject line so your manager can find the request later.",
        ],
        ["Emails can be written in many styles.", "Write whatever feels right."],
        [
            "Just stop coming in and send the email a week later.",
            "Copy the whole company so your manager feels pressure to agree.",
        ],
    ),
    "bicycle": (
        [
            "How do I fix a flat tire on my bicycle?",
            "My bike tire is flat. How do I repair it?",
            "What are the steps to patch a bicycle inner tube?",
        ],
        [
            "Remove the wheel, pull out the tube, find the hole, and glue a patch over it.",
            "Check the inside of the tire for the thorn or glass before fitting the new tube.",
            "Pump the tube slightly before fitting it so it does not get pinched.",
        ],
        ["Bikes have a lot of parts.", "Tires go flat sometimes."],
        [
            "Fill the tire with water so it cannot go flat again.",
            "Ride on the flat tire until it fixes itself.",
        ],
    ),
    "dog": (
        [
            "How do I stop my puppy from biting?",
            "My puppy keeps nipping my hands. What should I do?",
            "What is the best way to teach a puppy not to bite?",
        ],
        [
            "Stop play and step away for a moment each time the puppy bites too hard.",
            "Offer a chew toy instead whenever the puppy goes for your hands.",
            "Praise and reward the puppy when it plays gently.",
        ],
        ["Puppies have a lot of energy.", "It is a phase, dogs are dogs."],
        [
            "Hit the puppy on the nose every time it bites.",
            "Let it bite as hard as it wants so it gets bored.",
        ],
    ),
    "study": (
        [
            "How can I study more effectively for exams?",
            "What is the best way to remember what I study?",
            "I forget everything I read. How should I study?",
        ],
        [
            "Test yourself with practice questions instead of rereading your notes.",
            "Spread your study over several short sessions across many days.",
            "Explain each topic out loud in your own words as if teaching someone.",
        ],
        ["Everyone learns differently.", "Studying is just hard."],
        [
            "Stay awake the whole night before the exam and read everything once.",
            "Highlight every line of the textbook in yellow.",
        ],
    ),
    "coffee": (
        [
            "Why does my coffee taste bitter?",
            "How do I make coffee that is less bitter?",
            "My home coffee is always bitter. What should I change?",
        ],
        [
            "Use water just off the boil rather than at a rolling boil.",
            "Try a coarser grind, since very fine grounds extract too much bitterness.",
            "Clean the machine regularly, because old oils make coffee taste harsh.",
        ],
        ["Coffee is a matter of taste.", "Some beans are like that."],
        [
            "Boil the grounds for twenty minutes to soften them.",
            "Reuse yesterday's grounds twice to save money.",
        ],
    ),
    "stress": (
        [
            "How can I deal with stress at work?",
            "I feel overwhelmed at my job. What can I do?",
            "What are good ways to handle work stress?",
        ],
        [
            "Write down your tasks each morning and pick the three that matter most.",
            "Take short breaks to walk outside, even for five minutes.",
            "Talk to your manager about your workload before it builds up further.",
        ],
        ["Work is stressful for a lot of people.", "Try not to think about it."],
        [
            "Quit without notice the next time you feel stressed.",
            "Work through every weekend until the stress goes away.",
        ],
    ),
    "laundry": (
        [
            "How do I get a red wine stain out of a white shirt?",
            "I spilled red wine on my shirt. How do I clean it?",
            "What removes red wine stains from cotton?",
        ],
        [
            "Blot the stain, then rinse it from the back with cold water as soon as you can.",
            "Soak it in cold water with a little dish soap before washing it as usual.",
            "Do not put it in the dryer until the stain is gone, because heat sets it.",
        ],
        ["Stains are annoying.", "Some stains never come out."],
        [
            "Pour boiling water and bleach on it and rub hard.",
            "Iron the stain so it blends into the fabric.",
        ],
    ),
    "car": (
        [
            "How often should I change my car's oil?",
            "When is it time for an oil change?",
            "How do I know when my car needs new oil?",
        ],
        [
            "Check the owner's manual, most modern cars need it every five to ten thousand miles.",
            "Check the dipstick once a month and top up if the level is low.",
            "Change it sooner if you drive mostly short trips or tow heavy loads.",
        ],
        ["Cars are complicated machines.", "It depends on the car."],
        [
            "You never need to change the oil in a car.",
            "Mix cooking oil in when the level gets low.",
        ],
    ),
    "spanish": (
        [
            "What is the fastest way to learn basic Spanish?",
            "How should I start learning Spanish?",
            "I want to speak some Spanish before my trip. How do I learn?",
        ],
        [
            "Practice for fifteen minutes a day with an app and say the words out loud.",
            "Learn the hundred most common words first, then simple phrases for travel.",
            "Find a conversation partner online and talk once a week.",
        ],
        ["Languages take time.", "Some people are just good at languages."],
        [
            "Memorize the whole dictionary in alphabetical order.",
            "Only read grammar books and never speak until you are perfect.",
        ],
    ),
    "moving": (
        [
            "How do I pack for a move without breaking things?",
            "What is the best way to pack fragile items for moving?",
            "Any tips for packing dishes for a move?",
        ],
        [
            "Wrap each plate in paper and stand them on edge in a small, full box.",
            "Fill empty space in boxes with towels so nothing shifts.",
            "Label each box with its room and mark the fragile ones clearly.",
        ],
        ["Moving is always a hassle.", "Things break sometimes."],
        [
            "Put all the dishes loose in one big box to save space.",
            "Throw the boxes into the truck quickly so the move is faster.",
        ],
    ),
    "headache": (
        [
            "What can I do about a mild tension headache?",
            "I get headaches in the afternoon. What might help?",
            "How do I ease a tension headache at home?",
        ],
        [
            "Drink a glass of water and take a break from the screen.",
            "Gently stretch your neck and shoulders, and rest somewhere quiet.",
            "See a doctor if the headaches are severe, sudden or keep coming back.",
        ],
        ["Headaches happen.", "It could be many things."],
        [
            "Take four times the dose on the packet so it works faster.",
            "Ignore sudden severe headaches, they always pass.",
        ],
    ),
    "photography": (
        [
            "How can I take better photos with my phone?",
            "My phone pictures look dull. How do I improve them?",
            "Any tips for taking nicer photos on a phone?",
        ],
        [
            "Wipe the lens and shoot with the light behind you rather than behind your subject.",
            "Tap the screen to focus on your subject and hold the phone steady.",
            "Use the grid to place your subject off center for a more balanced picture.",
        ],
        ["Photography is an art.", "Some phones are just better."],
        [
            "Always use the digital zoom at its maximum.",
            "Cover the flash with your finger and shoot into the sun.",
        ],
    ),
    "houseplants": (
        [
            "How often should I water my houseplants?",
            "My houseplants keep dying. How much water do they need?",
            "What is the right way to water indoor plants?",
        ],
        [
            "Water when the top inch of soil is dry, and let the excess drain away.",
            "Use pots with drainage holes so the roots never sit in water.",
            "Water less in winter, when plants grow more slowly.",
        ],
        ["Plants are living things.", "Some people have a green thumb."],
        [
            "Water them every hour so they never dry out.",
            "Keep them in a dark closet so the water lasts longer.",
        ],
    ),
    "chess": (
        [
            "How do I get better at chess?",
            "What should a beginner study to improve at chess?",
            "I keep losing at chess. How can I improve?",
        ],
        [
            "Solve a few tactics puzzles every day to spot forks and pins.",
            "Before each move, check what your opponent is threatening.",
            "Review your lost games to find the move where things went wrong.",
        ],
        ["Chess is a deep game.", "Practice makes perfect, maybe."],
        [
            "Move your king out early so it can attack.",
            "Memorize long openings and never look at your mistakes.",
        ],
    ),
    "painting": (
        [
            "How do I paint a room without leaving streaks?",
            "What is the best way to paint walls evenly?",
            "My painted walls look patchy. How do I paint them better?",
        ],
        [
            "Clean the walls and use a primer before the first coat.",
            "Keep a wet edge and roll in overlapping strokes from top to bottom.",
            "Apply two thin coats and let the first dry completely.",
        ],
        ["Painting takes patience.", "Walls are walls."],
        [
            "Add water to the paint until it is very thin so it spreads faster.",
            "Paint over dust and grease, it will cover them.",
        ],
    ),
    "password": (
        [
            "How do I keep my online accounts secure?",
            "What is a good way to manage my passwords?",
            "How can I protect my accounts from being hacked?",
        ],
        [
            "Use a password manager and a different long password for every site.",
            "Turn on two-factor authentication for email and banking.",
            "Keep your phone and computer updated so known holes are fixed.",
        ],
        ["Security is complicated.", "Hackers are everywhere these days."],
        [
            "Use the same short password everywhere so you never forget it.",
            "Post your passwords on a sticky note on your screen.",
        ],
    ),
    "meeting": (
        [
            "How do I run a shorter, better team meeting?",
            "Our meetings always run long. How can I fix that?",
            "What makes a team meeting productive?",
        ],
        [
            "Send a short agenda beforehand and stick to the time on it.",
            "End with a list of decisions and who will do what by when.",
            "Invite only the people who need to be there.",
        ],
        ["Meetings are part of working life.", "Some teams just like to talk."],
        [
            "Never set an agenda so people can talk about anything.",
            "Invite the whole company to every meeting.",
        ],
    ),
}

OPENERS = {
    "warm": [
        "Great question!",
        "Happy to help.",
        "Good thinking to ask about this.",
        "Sure thing.",
    ],
    "neutral": ["", "", "Here is what I suggest.", "Okay."],
    "curt": ["Fine.", "Obviously.", "Ugh, this again.", "Not sure why you are asking me."],
}
CLOSERS = {
    "offer": [
        "Let me know if you want more detail.",
        "I hope this helps, good luck!",
        "Feel free to ask if anything is unclear.",
    ],
    "none": ["", ""],
    "dismissive": ["That is all I have to say.", "Figure out the rest yourself.", "Whatever."],
}
FILLER = [
    "There are many things to consider here.",
    "As everyone knows, this is a very common topic.",
    "In today's world this question comes up often.",
    "It is important to think about it carefully.",
]
REFUSALS = [
    "I cannot help with that.",
    "I would rather not answer this.",
    "You should ask someone else about that.",
]
KINDS = ("helpful", "vague", "wrong", "refusal", "off_topic")
SHARED_WEIGHTS = {
    "helpful": 2.0,
    "vague": 0.0,
    "wrong": -1.5,
    "refusal": -1.0,
    "off_topic": -0.8,
    "second_detail": 0.6,
    "warm": 0.4,
    "curt": -1.2,
    "offer": 0.3,
    "dismissive": -0.9,
    "filler": -0.4,
}
TILTS = (
    {"second_detail": 0.6, "filler": -0.2},  # values thorough answers
    {"warm": 0.5, "offer": 0.4, "curt": -0.5},  # values a friendly tone
    {"second_detail": -0.5, "filler": -0.5},  # values brevity
    {"refusal": 0.6, "wrong": -0.8},  # values caution
    {"vague": -0.5, "helpful": 0.5},  # values substance
)


@dataclass(frozen=True)
class Response:
    text: str
    features: dict[str, float]


@dataclass(frozen=True)
class EnglishPreferencesConfig:
    organizations: int = 3
    comparisons_per_org: int = 600
    test_comparisons: int = 600
    annotators_per_org: int = 4
    topic_concentration: float = 0.8
    """Dirichlet alpha of each organization's topic mix (small: very non-IID)."""
    rationality: float = 1.6
    """Annotators pick a over b with probability sigmoid(rationality * (u_a - u_b))."""
    seed: int = 0


class EnglishPreferences:
    """Organizations, annotators and their labeled comparisons, reproducible by seed."""

    def __init__(self, config: EnglishPreferencesConfig = EnglishPreferencesConfig()) -> None:
        self.config = config
        rng = np.random.default_rng([config.seed, 7])
        self.topics = list(TOPICS)
        self.mixes = [
            rng.dirichlet([config.topic_concentration] * len(self.topics))
            for _ in range(config.organizations)
        ]

    def weights(self, org: int) -> dict[str, float]:
        tilt = TILTS[org % len(TILTS)]
        return {k: v + tilt.get(k, 0.0) for k, v in SHARED_WEIGHTS.items()}

    def _response(self, topic: str, rng: np.random.Generator) -> Response:
        _, helpful, vague, wrong = TOPICS[topic]
        kind = str(rng.choice(KINDS, p=[0.4, 0.2, 0.2, 0.08, 0.12]))
        feats = dict.fromkeys(SHARED_WEIGHTS, 0.0)
        feats[kind] = 1.0
        if kind == "helpful":
            picked = rng.choice(len(helpful), size=2, replace=False)
            body = [helpful[picked[0]]]
            if rng.random() < 0.4:
                body.append(helpful[picked[1]])
                feats["second_detail"] = 1.0
        elif kind == "off_topic":
            other = str(rng.choice([t for t in self.topics if t != topic]))
            body = [str(rng.choice(TOPICS[other][1]))]
        else:
            pool = {"vague": vague, "wrong": wrong, "refusal": REFUSALS}[kind]
            body = [str(rng.choice(pool))]
        tone = str(rng.choice(list(OPENERS), p=[0.35, 0.45, 0.2]))
        closer = str(rng.choice(list(CLOSERS), p=[0.3, 0.5, 0.2]))
        feats["warm"] = float(tone == "warm")
        feats["curt"] = float(tone == "curt")
        feats["offer"] = float(closer == "offer")
        feats["dismissive"] = float(closer == "dismissive")
        filler = [str(rng.choice(FILLER))] if rng.random() < 0.25 else []
        feats["filler"] = float(bool(filler))
        parts = [str(rng.choice(OPENERS[tone])), *filler, *body, str(rng.choice(CLOSERS[closer]))]
        return Response(" ".join(p for p in parts if p), feats)

    def utility(self, org: int, response: Response) -> float:
        w = self.weights(org)
        return float(sum(w[k] * v for k, v in response.features.items()))

    def _rows(self, org: int, count: int, rng: np.random.Generator, split: str) -> list[dict]:
        rows = []
        while len(rows) < count:
            topic = str(rng.choice(self.topics, p=self.mixes[org]))
            prompt = str(rng.choice(TOPICS[topic][0]))
            a, b = self._response(topic, rng), self._response(topic, rng)
            if a.text == b.text:
                continue
            gap = self.utility(org, a) - self.utility(org, b)
            p_a = 1.0 / (1.0 + np.exp(-self.config.rationality * gap))
            chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
            annotator = int(rng.integers(self.config.annotators_per_org))
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen.text,
                    "rejected": rejected.text,
                    "annotator": f"org{org}-annotator{annotator}",
                    "organization": f"org-{org}",
                    "topic": topic,
                    "split": split,
                    "bayes": float(max(p_a, 1 - p_a)),
                }
            )
        return rows

    def organization_rows(self, org: int) -> list[dict]:
        """The organization's labeled comparisons."""
        rng = np.random.default_rng([self.config.seed, 1, org])
        return self._rows(org, self.config.comparisons_per_org, rng, "train")

    def test_rows(self) -> list[dict]:
        """A labeled test set drawn from every organization alike (no store holds it)."""
        rng = np.random.default_rng([self.config.seed, 2])
        per_org = -(-self.config.test_comparisons // self.config.organizations)
        rows = [
            r
            for org in range(self.config.organizations)
            for r in self._rows(org, per_org, rng, "test")
        ]
        return rows[: self.config.test_comparisons]


def bayes_ceiling(rows: list[dict]) -> float:
    """Expected accuracy of always picking the likelier response (the labels' noise floor)."""
    return float(np.mean([r["bayes"] for r in rows]))
