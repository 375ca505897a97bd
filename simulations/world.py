"""A synthetic world in which the truth is known.

Prompts ask about a topic; responses are built from a small phrase grammar (opener,
answer, detail, caveat, closer). Each organization's annotators judge responses by
a hidden utility: core preferences shared by everyone (answer on topic, answer
quality, politeness, ...) plus an organization-specific tilt on style, and they
choose by a Bradley-Terry draw on it. Organizations also ask about different topics
(a Dirichlet mix), so their data are non-IID in prompts and preferences.

Because the utility is known, the simulation can report what real deployments
cannot: the Bayes-optimal comparison accuracy, and (later) the true utility of a
policy's generations. The utility is computed from the response *text*, so it
scores any generated string, not only grammar samples.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np

# Topic -> prompt objects and answer phrases by quality.
TOPICS: dict[str, dict[str, list[str]]] = {
    "cooking": {
        "objects": ["pasta", "soup", "bread", "rice", "curry"],
        "good": ["Simmer it gently and taste as you go.", "Use fresh herbs and a hot pan."],
        "vague": ["Cook it until it seems done."],
        "wrong": ["Leave it raw on the counter overnight."],
    },
    "fitness": {
        "objects": ["run", "workout", "stretch", "swim", "hike"],
        "good": ["Warm up first and build up slowly.", "Rest well and drink plenty of water."],
        "vague": ["Move your body somehow."],
        "wrong": ["Train through sharp pain every day."],
    },
    "money": {
        "objects": ["budget", "savings", "debt", "taxes", "rent"],
        "good": ["Track spending and save a fixed share.", "Pay the costly debt first."],
        "vague": ["Money can be tricky."],
        "wrong": ["Put it all on one lucky bet."],
    },
    "code": {
        "objects": ["bug", "script", "test", "website", "database"],
        "good": [
            "Write a small test that shows the problem.",
            "Read the error and check the logs.",
        ],
        "vague": ["Computers are complicated."],
        "wrong": ["Delete the tests until it passes."],
    },
}
QUESTION_TEMPLATES = [
    "How do I handle my {obj}?",
    "Any advice on my {obj}?",
    "What should I do about the {obj}?",
    "Can you help me with my {obj}?",
]
GREETINGS = ["", "Hello.", "Hey.", "Good morning.", "Hi team.", "Quick question."]
SITUATIONS = [
    "",
    "I am new to this.",
    "This is urgent.",
    "My friend asked me.",
    "I tried before.",
    "I have little time.",
]
PROMPT_CONTEXTS = [f"{g} {s}".strip() for g in GREETINGS for s in SITUATIONS]
"""Optional first sentences that make prompts distinct (a prompt is a privacy unit
in policy rounds, and a store holds each prompt text once): 36 x 80 prompts."""
HELDOUT_CONTEXTS = ["Hi there.", "One more thing."]
"""Contexts of the held-out prompts on which policies are judged: in the base's
pretraining text, never in any organization's store."""
QUALITY = {"good": 1.0, "vague": 0.0, "wrong": -1.0}

# Style phrases: slot -> phrase -> style features it carries.
STYLE: dict[str, dict[str, dict[str, float]]] = {
    "opener": {
        "Sure.": {"polite": 1.0},
        "Great question!": {"enthusiastic": 1.0},
        "Hello friend.": {"polite": 1.0, "warm": 1.0},
        "Ugh, fine.": {"polite": -1.0},
    },
    "detail": {
        "First plan it, then check it twice.": {"detailed": 1.0},
        "It depends on many things.": {"hedge": 1.0},
    },
    "caveat": {
        "Be careful and stay safe.": {"cautious": 1.0},
        "Ask an expert if unsure.": {"cautious": 1.0, "hedge": 0.5},
    },
    "closer": {
        "Hope this helps!": {"polite": 1.0, "enthusiastic": 0.5},
        "Good luck.": {"polite": 0.5},
        "Whatever.": {"polite": -1.0},
    },
}
SLOTS = ("opener", "answer", "detail", "caveat", "closer")
STYLE_FEATURES = ("polite", "enthusiastic", "warm", "detailed", "hedge", "cautious")
FEATURES = ("on_topic", "quality", *STYLE_FEATURES, "words", "unknown", "repeated")

CORE_WEIGHTS: dict[str, float] = {
    "on_topic": 0.8,  # the answer is about the asked topic
    "quality": 1.5,  # good > vague > wrong
    "polite": 0.6,
    "enthusiastic": 0.1,
    "warm": 0.2,
    "detailed": 0.6,
    "hedge": -0.4,
    "cautious": 0.3,
    "words": -0.03,  # per word: brevity
    "unknown": -1.5,  # per sentence outside the grammar (generated text)
    "repeated": -1.0,  # per repeated phrase
}


@dataclass(frozen=True)
class WorldConfig:
    organizations: int = 5
    comparisons_per_org: int = 2000
    """Local comparisons each organization holds (train + held-out)."""
    prompts_per_org: int = 60
    """Prompts an organization's comparisons are about (drawn with replacement)."""
    policy_prompts_per_org: int = 2000
    """Distinct prompts in each store for policy rounds (PPO's privacy units)."""
    test_pairs_per_org: int = 400
    """Pairs per organization in the simulation's global test set (never in a store)."""
    topic_concentration: float = 0.5
    """Dirichlet alpha of each organization's topic mix: small = very non-IID."""
    tilt_scale: float = 0.3
    """Std of each organization's extra weight on each style feature."""
    rationality: float = 1.5
    """Annotators choose a over b with probability sigmoid(rationality * (u_a - u_b))."""
    answer_on_topic: float = 0.6
    """Probability that a sampled response answers the asked topic."""
    slot_presence: float = 0.6
    """Probability that an optional slot (opener, detail, caveat, closer) is filled."""
    seed: int = 0

    def text_fingerprint(self) -> str:
        """Identifies the world's *text* distribution (what the base model is trained on)."""
        text_fields = {k: asdict(self)[k] for k in ("answer_on_topic", "slot_presence", "seed")}
        grammar = [TOPICS, STYLE, QUESTION_TEMPLATES, PROMPT_CONTEXTS, HELDOUT_CONTEXTS]
        return hashlib.sha256(
            json.dumps([text_fields, grammar], sort_keys=True).encode()
        ).hexdigest()[:12]


@dataclass(frozen=True)
class Organization:
    index: int
    topic_mix: tuple[float, ...]
    tilt: dict[str, float]
    prompts: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"org-{self.index}"

    def weights(self) -> dict[str, float]:
        return {f: CORE_WEIGHTS[f] + self.tilt.get(f, 0.0) for f in FEATURES}


@dataclass(frozen=True)
class Pair:
    """A comparison candidate: two responses to one prompt, judged by one organization."""

    org: int
    prompt: str
    a: str
    b: str


def _phrase_index() -> dict[str, tuple[str, str, dict[str, float]]]:
    """phrase -> (slot, topic or "", features) for every phrase of the grammar."""
    index: dict[str, tuple[str, str, dict[str, float]]] = {}
    for topic, spec in TOPICS.items():
        for quality, value in QUALITY.items():
            for phrase in spec[quality]:
                index[phrase] = ("answer", topic, {"quality": value})
    for slot, phrases in STYLE.items():
        for phrase, feats in phrases.items():
            index[phrase] = (slot, "", feats)
    return index


PHRASES = _phrase_index()
_BY_LENGTH = sorted(PHRASES, key=len, reverse=True)


def all_prompts(contexts: list[str] = PROMPT_CONTEXTS) -> list[str]:
    """Every prompt of the grammar with one of ``contexts`` as its first sentence."""
    return [
        f"{context} {t.format(obj=obj)}".strip()
        for context in contexts
        for spec in TOPICS.values()
        for obj in spec["objects"]
        for t in QUESTION_TEMPLATES
    ]


def heldout_prompts() -> list[str]:
    """Prompts no store holds, for judging policies' generations."""
    return all_prompts(HELDOUT_CONTEXTS)


def topic_of(prompt: str) -> str | None:
    for topic, spec in TOPICS.items():
        if any(obj in prompt for obj in spec["objects"]):
            return topic
    return None


def features(prompt: str, response: str) -> dict[str, float]:
    """Parse a response into features: known phrases by greedy match, the rest unknown."""
    out = dict.fromkeys(FEATURES, 0.0)
    out["words"] = float(len(response.split()))
    asked = topic_of(prompt)
    seen: set[str] = set()
    text = response.strip()
    while text:
        phrase = next((p for p in _BY_LENGTH if text.startswith(p)), None)
        if phrase is None:
            # Skip to the end of this sentence; it counts as unknown text.
            ends = [i for i in (text.find(". "), text.find("! "), text.find("? ")) if i >= 0]
            cut = min(ends) + 2 if ends else len(text)
            out["unknown"] += 1.0
            text = text[cut:].strip()
            continue
        slot, topic, feats = PHRASES[phrase]
        text = text[len(phrase) :].strip()
        if slot in seen:
            out["repeated"] += 1.0
            continue
        seen.add(slot)
        if slot == "answer":
            out["on_topic"] = float(topic == asked)
            out["quality"] = feats["quality"]
        else:
            for name, value in feats.items():
                out[name] += value
    return out


@dataclass
class World:
    config: WorldConfig = field(default_factory=WorldConfig)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.config.seed)
        topics = list(TOPICS)
        # Comparisons are about the plain questions; the policy prompts add contexts.
        plain = all_prompts([""])
        by_topic = {topic: [p for p in plain if topic_of(p) == topic] for topic in topics}
        self.organizations: list[Organization] = []
        for index in range(self.config.organizations):
            mix = rng.dirichlet([self.config.topic_concentration] * len(topics))
            tilt = {f: float(rng.normal(0.0, self.config.tilt_scale)) for f in STYLE_FEATURES}
            counts = rng.multinomial(self.config.prompts_per_org, mix)
            prompts = []
            for topic, count in zip(topics, counts, strict=True):
                prompts += list(rng.choice(by_topic[topic], size=count, replace=True))
            self.organizations.append(
                Organization(index, tuple(mix.tolist()), tilt, tuple(prompts))
            )

    # -- text ------------------------------------------------------------------------

    def sample_response(self, prompt: str, rng: np.random.Generator) -> str:
        """A response from the grammar, as an untrained assistant might write it."""
        c = self.config
        asked = topic_of(prompt) or "cooking"
        topic = (
            asked
            if rng.random() < c.answer_on_topic
            else rng.choice([t for t in TOPICS if t != asked])
        )
        quality = rng.choice(list(QUALITY))
        parts = []
        for slot in SLOTS:
            if slot == "answer":
                parts.append(str(rng.choice(TOPICS[topic][quality])))
            elif rng.random() < c.slot_presence:
                parts.append(str(rng.choice(list(STYLE[slot]))))
        return " ".join(parts)

    def utility(self, org: int, prompt: str, response: str) -> float:
        w = self.organizations[org].weights()
        return float(sum(w[f] * v for f, v in features(prompt, response).items()))

    def federation_utility(self, prompt: str, response: str) -> float:
        """The true utility a policy is judged by: the organizations' mean."""
        feats = features(prompt, response)
        weights = [o.weights() for o in self.organizations]
        return float(np.mean([sum(w[f] * v for f, v in feats.items()) for w in weights]))

    def policy_prompts(self, org: int) -> list[str]:
        """The organization's distinct prompts for policy rounds, from its topic mix."""
        rng = np.random.default_rng([self.config.seed, 3, org])
        prompts = all_prompts()
        mix = dict(zip(TOPICS, self.organizations[org].topic_mix, strict=True))
        weights = np.array([mix[topic_of(p)] for p in prompts]) + 1e-9
        count = min(self.config.policy_prompts_per_org, len(prompts))
        picked = rng.choice(len(prompts), size=count, replace=False, p=weights / weights.sum())
        return [prompts[i] for i in sorted(picked)]

    def corpus(self, size: int, seed: int) -> list[str]:
        """Prompt/response texts for pretraining the base model (no preferences in it)."""
        rng = np.random.default_rng(seed)
        prompts = all_prompts(PROMPT_CONTEXTS + HELDOUT_CONTEXTS)
        return [
            f"{p}\n{self.sample_response(p, rng)}"
            for p in (str(rng.choice(prompts)) for _ in range(size))
        ]

    # -- comparisons -----------------------------------------------------------------

    def sample_pairs(self, org: int, count: int, rng: np.random.Generator) -> list[Pair]:
        prompts = self.organizations[org].prompts
        pairs = []
        while len(pairs) < count:
            prompt = str(rng.choice(prompts))
            a, b = self.sample_response(prompt, rng), self.sample_response(prompt, rng)
            if a != b:
                pairs.append(Pair(org, prompt, a, b))
        return pairs

    def preference_probability(self, pair: Pair) -> float:
        """P(an annotator of the pair's organization prefers a over b)."""
        gap = self.utility(pair.org, pair.prompt, pair.a) - self.utility(
            pair.org, pair.prompt, pair.b
        )
        return float(1.0 / (1.0 + np.exp(-self.config.rationality * gap)))

    def label(self, pair: Pair, rng: np.random.Generator) -> tuple[str, str]:
        """An annotator's Bradley-Terry draw: (chosen, rejected)."""
        if rng.random() < self.preference_probability(pair):
            return pair.a, pair.b
        return pair.b, pair.a

    def local_comparisons(self, org: int) -> list[tuple[str, str, str]]:
        """The organization's labeled comparisons (prompt, chosen, rejected)."""
        rng = np.random.default_rng([self.config.seed, 1, org])
        pairs = self.sample_pairs(org, self.config.comparisons_per_org, rng)
        return [(p.prompt, *self.label(p, rng)) for p in pairs]

    def test_pairs(self) -> list[Pair]:
        """The global held-out test set: unlabeled pairs from every organization."""
        rng = np.random.default_rng([self.config.seed, 2])
        return [
            p
            for org in range(self.config.organizations)
            for p in self.sample_pairs(org, self.config.test_pairs_per_org, rng)
        ]


def expected_accuracy(probabilities: np.ndarray, margins: np.ndarray) -> float:
    """Accuracy against fresh annotator labels, in expectation (no label noise in it).

    ``probabilities[i]`` = P(a preferred), ``margins[i]`` = model score(a) - score(b).
    """
    picks_a = margins > 0
    return float(np.where(picks_a, probabilities, 1 - probabilities).mean())


def bayes_accuracy(probabilities: np.ndarray) -> float:
    """The ceiling for any reward model: always pick the likelier response."""
    return float(np.maximum(probabilities, 1 - probabilities).mean())
