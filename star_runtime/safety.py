"""Safety layer: crisis detection on user messages, a screen on model replies, crisis resources.

A rule-based, English-only support tool, not a clinician (README, "Safety"). Three parts:

    detect_crisis(user_text)  -> SafetyVerdict(escalate, category, matched)
    encourages_harm(reply)    -> the phrase that makes a model reply unsafe, or None
    SafetyPolicy              -> both, plus the fixed crisis reply with per-locale resources

Detection, for a text x:

    n, starts, ends = normalise(x)    n: folded text; n[j] stands for x[starts[j]:ends[j]]
    for category in (suicide, self_harm, harm_others):        first accepted match wins
        for rule in rules[category], for each match m of rule in n that starts a word:
            accept m  unless  a benign pattern overlaps m       ("killing myself laughing")
                      or      the words just before m deny it   ("I would never", "I'm not")
    matched = x[starts[m.start]:ends[m.end - 1]]                the phrase as written

normalise: per character NFKD, drop combining marks and format characters (zero-width space,
soft hyphen), casefold, map look-alike Cyrillic/Greek letters to Latin; digits and symbols inside
words read as letters ("k1ll", "su1c1de", "$uicide"); apostrophes dropped ("don't" == "dont" ==
"don’t"); clause punctuation becomes " . " or " , "; anything else (emoji, control characters)
a space; runs of a repeated letter squeezed to one ("dieeee", "kill" -> "kil"). Patterns are
written in plain spelling and squeezed the same way when compiled, so they read normally here.

Negation, the choice made: only a categorical denial right before the match cancels it
("never", "not", "won't", "wouldn't", "no intention of", "don't" + the verb: "I don't self
harm"). "I don't want to kill myself" is NOT a denial: people say it while the thought is
present ("... but I keep thinking about it"), and a clinician would ask rather than move on, so
it escalates. "I don't want to die" is a denial (fear of death, not ideation). Phrases whose
negation is the ideation ("I don't want to live anymore") are patterns of their own.

Other choices: third-person reports ("my friend wants to kill herself") and bereavement by
suicide escalate (the person writing needs the resources too); past ideation escalates (it
cannot be told from a relapse); hyperbole with a person as object ("I could kill him")
escalates; idioms without one ("I could kill for a pizza") do not; informational frames
("essay about suicide prevention", "warning signs of suicide") do not.

Every quantifier is bounded (gaps of at most a few words of at most 24 letters), so a 100 kB
message is checked in linear time (tests/test_safety.py measures it).
"""

from __future__ import annotations

import json
import re
import unicodedata
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from itertools import accumulate
from pathlib import Path

CATEGORIES = ("suicide", "self_harm", "harm_others")  # also the priority when several match

# Shown before the resource lines. Worded to fit the person at risk, someone writing about
# another person ("my friend wants to kill herself"), and a model reply that had to be replaced.
CRISIS_MESSAGE = (
    "It sounds like things are really hard right now, and your safety matters. I'm an "
    "automated support tool, not a counsellor, and I can't keep anyone safe on my own. Please "
    "reach out to a real person now, for yourself or for someone you're worried about:"
)


class SafetyConfigError(ValueError):
    """A crisis-resources file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class SafetyVerdict:
    """What the detector found. `matched` is the phrase as the user wrote it, for logs."""

    escalate: bool
    category: str | None = None
    matched: str | None = None


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

_APOSTROPHES = frozenset("'\u2018\u2019\u201b\u02bc\u02b9`\u00b4\u2032")
_MARKS = {
    **dict.fromkeys(".!?;:\n\r\u2026\u3002\uff01\uff1f", "."),  # clause ends
    **dict.fromkeys(",\u060c\u3001", ","),
}
_CAPITAL_I_AS_L = re.compile(r"(?<=[a-z])I")
# Cyrillic and Greek letters that render like Latin ones ("кill"); the common ones only.
_CONFUSABLES = str.maketrans(
    # Cyrillic а с е о р х у і ј ѕ ԁ к, then Greek α ι κ ν ο τ
    "\u0430\u0441\u0435\u043e\u0440\u0445\u0443\u0456\u0458\u0455\u0501\u043a"
    "\u03b1\u03b9\u03ba\u03bd\u03bf\u03c4",
    "aceopxyijsdkaikvot",
)
# Symbols read as letters when they sit inside a word. "1" is "l" after i/l/a ("ki11", "a11")
# and "i" elsewhere ("k1ll", "su1c1de").
_LEET = {"0": "o", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"}
_LEET_CHARS = frozenset(_LEET) | {"1"}


@lru_cache(maxsize=8192)
def _fold(ch: str) -> str:
    """One character folded: NFKD, no combining marks or format characters, casefolded."""
    if ch.isascii():
        return ch.lower()
    decomposed = unicodedata.normalize("NFKD", ch)
    kept = "".join(c for c in decomposed if unicodedata.category(c) not in ("Mn", "Me", "Cf"))
    return kept.casefold().translate(_CONFUSABLES)


def normalise(text: str) -> tuple[str, list[int], list[int]]:
    """Fold `text` for matching (module docstring).

    Returns (out, starts, ends): out[j] stands for text[starts[j]:ends[j]] (a squeezed run
    stands for all its letters). `out` is lowercase words separated by single spaces, with
    " . " at clause ends and " , " at commas. One pass over the characters; ASCII text (most
    messages) skips the per-character Unicode folding.
    """
    # A capital I inside a lowercase word stands for l ("kiII" reads as "kill"); same length.
    text_l = _CAPITAL_I_AS_L.sub("l", text)
    if text_l.isascii():
        chars: str = text_l.lower()
        where: range | list[int] = range(len(chars))
    else:
        pieces = [_fold(ch) for ch in text_l]
        chars = "".join(pieces)
        if len(chars) == len(text_l):
            where = range(len(chars))
        else:
            where = [i for i, piece in enumerate(pieces) for _ in piece]

    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    last = " "  # last character written to `out` (a space before the first)
    n = len(chars)
    for j in range(n):
        c = chars[j]
        i = where[j]
        if c in _LEET_CHARS:
            before_letter = j + 1 < n and chars[j + 1].isalpha()
            if last.isalpha():
                if c == "1":
                    c = "l" if last in "ila" else "i"
                elif before_letter or c not in "!$@":  # "die!" stays a clause end
                    c = _LEET.get(c, c)
            elif c in "$@" and before_letter and not last.isalnum():
                c = _LEET[c]  # word-initial: "$uicide", "@ll"
        if c.isalnum():
            if c == last and c.isalpha():  # squeeze "dieeee" -> "die"
                ends[-1] = i + 1
                continue
            out.append(c)
        elif c in _APOSTROPHES:
            continue
        elif c in _MARKS:
            mark = _MARKS[c]
            if last != " ":
                out.append(" ")
                starts.append(i)
                ends.append(i + 1)
            if len(out) >= 2 and out[-2] == mark:  # "!!!" -> one mark
                continue
            out.append(mark)
            starts.append(i)
            ends.append(i + 1)
            c = " "
            out.append(c)
        elif last != " ":
            c = " "
            out.append(c)
        else:
            continue
        starts.append(i)
        ends.append(i + 1)
        last = c
    if out and out[-1] == " ":
        out.pop()
        starts.pop()
        ends.pop()
    return "".join(out), starts, ends


# ---------------------------------------------------------------------------------------------
# Patterns. Written in plain spelling; `_compile` squeezes doubled letters (as `normalise` does
# to the text) and lets the word "to" also match "2" ("want 2 die").
# ---------------------------------------------------------------------------------------------


def _compile(source: str) -> re.Pattern[str]:
    # Squeezing works within a word only: a double letter across a joint ("room mate" ->
    # "roommate" -> "romate") needs the joined spelling written out too.
    squeezed = re.sub(r"(?<!\\)([a-z])\1+", r"\1", source)
    # Word gaps are bounded: an unbounded \w* tried at every "kil" of a 100 kB run of
    # "killkill..." is quadratic (10 s measured); no English word needs more than 24 letters.
    squeezed = squeezed.replace(r"\w*", r"\w{0,24}").replace(r"\w+", r"\w{1,24}")
    with_two = re.sub(r"(?<![\\\w])to(?!\w)", "(?:to|2)", squeezed)
    # No leading (?<!\w): it stops `re` from skipping ahead by first character (a 100 kB scan
    # took 6.3 ms with it, 0.9 ms without); `_word_matches` checks the word start instead.
    return re.compile(rf"(?:{with_two})(?!\w)")


SELF = r"(?:my ?sel?f|myslef|meself|him ?self|her ?self|them ?selves|them ?self|their ?selves)"
YOURSELF = r"(?:your ?self|ur ?self|your ?selves)"
# Someone a threat can be aimed at. "her" alone is an object only at a clause end or before a
# linking word ("kill her tonight"), not before a noun ("she killed her exam").
_RELATIONS = (
    r"(?:step ?|ex ?)?(?:mom|mum|mother|dad|father|parents?|brothers?|sisters?|siblings?|"
    r"husband|wife|boyfriend|girlfriend|partner|ex|boss|manager|teacher|coach|sons?|"
    r"daughters?|kids?|children|child|baby|babies|family|neighbou?rs?|room mates?|roomates?|"
    r"flat ?mates?|friends?|co ?workers?|colleagues?|class ?mates?|uncle|aunt|cousin|"
    r"grandma|grandpa|bully|bullies|landlord|guy|girl|man|woman|men|women|people|person|"
    r"newborn|infant|toddler|twins|"
    r"students?|bitch|bastard)"
)
PERSON = (
    r"(?:(?:my|his|her|their|your|our|the|that|this|those|these) " + _RELATIONS + r"|"
    r"him|them|someone|somebody|anyone|anybody|everyone|everybody|people|others|other people|"
    r"her(?= *(?:$|[.,])| (?:and|or|if|when|because|for|so|with|tonight|today|tomorrow|now|"
    r"too|again|already|soon|someday|first|right now|in her sleep)(?!\w)))"
)
# Words before a verb that make it an intention, a plan, an urge or a fear of acting.
INTENT = (
    r"(?:wants? to|wanted to|wanna|going to|gonna|planning (?:to|on)|plan (?:to|on)|"
    r"thinking (?:about|of)|think about|thought about|thoughts (?:of|about)|"
    r"fantasi[sz](?:e|ing) about|dream(?:ing)? (?:of|about)|urges? to|tempted to|ready to|"
    r"about to|feel like|need to|have to|i ?l|ill|i will|will|might|could|"
    r"(?:afraid|scared|worried|terrified) (?:i|i ?l|ill|that i))"
)
PILLS = (
    r"(?:pills|tablets|meds|medication|medicine|painkillers|pain killers|paracetamol|tylenol|"
    r"insulin|antidepressants)"
)
HIGH_PLACE = r"(?:bridge|building|roof|rooftop|balcony|cliff|tower|overpass|window|ledge|car park)"
VEHICLE = r"(?:train|bus|car|truck|lorry|tram|subway|traffic|oncoming traffic)"
TOPIC = r"(?:suicide|self harm\w*|self injury)"
# Where self-harm is usually done, and (BODY) any body part an accident can happen to.
SKIN = r"(?:(?:my|his|her|their) (?:wrists?|arms?|legs?|thighs?|skin|stomach))"
BODY = (
    r"(?:(?:my|his|her|their) (?:wrists?|arms?|legs?|thighs?|skin|stomach|hands?|fingers?|face|"
    r"head))"
)
SELF_HARM_VERB = (
    r"(?:hurt|hurts|hurting|harm\w*|cut|cuts|cutting|burn\w*|injur\w*|mutilat\w*|starv\w*|"
    r"hit|hits|hitting|punch\w*|slap\w*|bite|bites|biting|scratch\w*|carv\w*)"
)

_USER_RULES: dict[str, tuple[str, ...]] = {
    "suicide": (
        rf"(?:kil|end)\w* {SELF}|kms|unaliv\w*(?: {SELF})?|sewer ?slide",
        r"s(?:u|ui|iu)[cs]i?d(?:e|es|al|ial|ality)",  # suicide, suicidal, sucide, suiside, suicde
        r"(?:end|ends|ending|ended) (?:(?:my|his|her|their) (?:own )?life|it all)",
        r"(?:take|takes|taking|took|taken) (?:my|his|her|their) (?:own )?life"
        r"(?! back| into| in| more| seriously| forward)",
        r"(?:want|wants|wanted|wanting) to (?:die|be dead)|wanna (?:die|be dead)|"
        r"(?:ready|deserve|prefer) to die|"
        r"wish (?:i|i was|i were|i could|i would)(?: just)? (?:die|dead|be dead)|"
        r"want to (?:not exist|stop existing|not be alive|cease to exist|disappear forever|"
        r"be gone forever|not wake up)",
        r"(?:think|thinking|thought|thoughts|fantasi[sz]\w*|dream\w*|obsess\w*) (?:about|of) "
        r"(?:dying|being dead|my own death|not being (?:here|alive|around)|not existing|"
        r"not waking up|ending (?:it|things|my life))",
        r"rather die than (?:keep |go on |going on )?(?:live|living|be alive|being alive|wake up)",
        r"better off dead|(?:i|id|i would|im) (?:be )?better off gone",
        r"(?:better off|happier|easier|better)(?: \w+){0,2} if i (?:was|were) (?:gone|dead|never born)|"
        r"(?:better off|happier|easier|better)(?: \w+){0,2} if i (?:wasnt|werent|was not|were not) "
        r"(?:here|around|alive|born)|"
        r"(?:better off|happier|easier|better)(?: \w+){0,2} if i (?:died|disappeared|never existed)",
        r"(?:everyone|everybody|world|family|kids|children|they|theyd|people|friends|parents|"
        r"all)(?: \w+){0,3} better off without me",
        r"better off if i (?:was|were|wasnt|werent|was not|were not|died|disappeared|"
        r"never existed)(?: (?:dead|gone|here|around|alive|born))?",
        r"(?:no ?one|nobody|noone)(?: \w+){0,2} (?:care|cares|notice|notices|miss me|mind)"
        r"(?: \w+){0,2} if i (?:died|was dead|were dead|was gone|were gone|disappeared|"
        r"killed myself|wasnt here|was not here|wasnt around)",
        r"(?:dont|do not|dont really|no longer) (?:want to|wanna) (?:be alive|exist|be here "
        r"(?:anymore|any more|no more)|live(?= *(?:$|[.,]| anymore| any more| any longer| no more| "
        r"like this)))",
        r"(?:not sure|dont know|unsure)(?: if| whether)? i (?:still |even )?want to "
        r"(?:live|be alive|be here|go on|keep living|keep going)",
        r"no (?:reason|point|purpose|will) (?:in |to |of )?(?:live|living|go on|going on|"
        r"keep going|keep living|carry on|carrying on|be alive|being alive|exist|existing)",
        r"nothing (?:left )?to live for",
        r"(?:dont|cant|do not|cannot|can not) see (?:a|any|the) (?:point|reason) (?:in|of|to) "
        r"(?:living|live|going on|keep going|keep living|being alive|life)",
        r"whats the point (?:of|in) (?:living|life|going on|being alive|carrying on)",
        r"(?:life|living) (?:isnt|is not|aint|s not|no longer|doesnt seem|does not seem|"
        r"doesnt feel|does not feel)(?: \w+)? worth (?:living|it)|not worth living",
        r"(?:cant|can not|cannot) go on (?:living|anymore|any more|any longer)|"
        r"(?:cant|can not|cannot|dont want to) (?:keep|go on|carry on) (?:living|live)",
        r"(?:feel like|want to|wanna|thinking (?:about|of)|going to|gonna|ready to|about to) "
        r"end(?:ing)? it(?: all)?(?= *(?:$|[.,]| tonight| today| now| soon| for good))",
        r"noose|goodbye (?:letters?|notes?)",
        r"(?:dont think|do not think) (?:i ?l|ill|i will) be (?:around|here|alive) (?:much longer|"
        r"for (?:much|very) long|anymore)|(?:wont|will not) be (?:around|here|alive) (?:much longer|"
        r"for (?:much|very) long)",
        r"give up on (?:life|living)|tired of (?:living|being alive|life)|done with (?:life|living)",
        r"(?:sleep|go to sleep|fall asleep|close my eyes)(?: \w+){0,3} and (?:never|not) wake up|"
        r"hope i (?:dont|do not|never) wake up|sleep forever|never wake up again|"
        r"(?:dont|do not) want to wake up (?:again|anymore|any more|ever|tomorrow)",
        rf"hang\w* {SELF}|(?:slit|slice|slash)\w* (?:my|his|her|their) wrists?",
        rf"(?:shoot|shot|shooting) {SELF}(?! in the foot)",
        # an intention followed by a method (one rule: each scan of a 100 kB text costs ~5 ms)
        rf"{INTENT}(?: \w+){{0,2}} (?:"
        rf"(?:jump\w*|throw\w* {SELF}) (?:off|from|out of)(?: \w+){{0,2}} {HIGH_PLACE}|"
        rf"(?:jump\w*|step\w*|walk\w*|run\w*|throw\w* {SELF}|lie down|lay down) in front of "
        rf"(?:a|an|the|some) {VEHICLE}|"
        r"(?:drive|driving|crash|crashing|steer|steering)(?: my car| the car| it)? (?:off|into)"
        r"(?: \w+){0,2} (?:bridge|cliff|tree|wall|river|lake|sea|traffic)|"
        r"(?:take|swallow|down) (?:all|every single one|every one) "
        rf"(?:of )?(?:my |the |these |those |her |his )?(?:\w+ )?{PILLS}|"
        r"overdose|od)",
        rf"(?:sav|stockpil|hoard|stash|collect)\w*(?: up)?(?: \w+){{0,2}} {PILLS}|"
        rf"{PILLS}(?: \w+){{0,2}} (?:saved|stockpiled|stashed|hidden)|"
        # twenty or more at once is not a dose anyone takes by mistake
        rf"(?:take|took|taken|taking|swallow\w*) (?:[2-9]\d|\d{{3,}})(?: \w+){{0,2}} {PILLS}|"
        rf"(?:the whole|an entire|a full) (?:bottle|box|pack|packet|strip|jar) of(?: \w+)? {PILLS}|"
        r"(?:take|took|taken|taking|did|do) an overdose|overdos\w* on purpose|"
        rf"{PILLS}(?: \w+){{0,3}} on purpose|(?:take|took|taken|taking|swallowed) (?:way )?too many "
        rf"{PILLS}",
        r"how (?:many|much)(?: \w+){0,5} (?:to|would it take to|does it take to) (?:die|kill (?:me|"
        r"myself|a person|someone)|end it|od|overdose|be lethal|be fatal)|"
        r"(?:lethal|fatal|deadly) (?:dose|amount|quantity)",
        r"(?:painless|easiest|quickest|fastest|best|surest|least painful|simplest) (?:way|ways|method|"
        rf"methods) to (?:die|kill {SELF}|end (?:my life|it|it all)|commit suicide)",
    ),
    "self_harm": (
        rf"{SELF_HARM_VERB} {SELF}",
        r"self ?(?:harm\w*|injur\w*|mutilat\w*)",
        rf"(?:cut|carv|slash)\w* {SKIN}|burn\w* {BODY}(?: \w+){{0,2}} (?:with|using) (?:a |"
        r"my |the )?(?:cigarettes?|lighters?|matches|lit|hot|iron|candle)",
        r"(?:urges?|need|tempted|want|wanting|craving) to (?:cut|self harm|burn myself)"
        r"(?= *(?:$|[.,]| again| tonight| today| so| is| are| has| right now| really| badly))",
        r"(?:im|ive been|i been|been|started|start|starting) cutting again|"
        r"relapse\w*(?: \w+){0,3} (?:self harm\w*|cutting)",
        r"(?:scratch|cut|pick|bite|hit|punch|claw)\w*(?: \w+){0,3} until (?:i|it|they|my \w+) "
        r"(?:bleed|bleeds|bled)",
    ),
    "harm_others": (
        rf"(?:kil|kils|kiled|kiling|murder\w*|stab\w*|strangl\w*|shoot|shoots|shooting|shot|"
        rf"poison\w*|choke|choking) {PERSON}",
        rf"beat\w* (?:{PERSON}) (?:up|to death)",
        rf"{INTENT}(?: \w+){{0,2}} (?:run|running|ran) (?:{PERSON}) (?:over|down)",
        rf"{INTENT}(?: \w+){{0,2}} (?:hurt|hurting|harm|harming|attack|attacking) {PERSON}",
        r"(?:bring|take|bringing|taking) (?:a|my|his|her|the) (?:gun|knife|weapon|rifle) to "
        r"(?:school|work|class|church|college|the office)|"
        r"shoot\w* up (?:the|my|our|a|this) (?:school|class|office|church|mall|workplace)",
    ),
}

# Spans where a rule's words mean something else. A match that overlaps one is dropped.
_BENIGN = (
    rf"kil\w* {SELF} (?:laughing|working|studying|training|at work|at the gym|over (?:this|that|it|"
    r"work)|to (?:finish|get|meet|make|pay|keep up|please))",
    rf"(?:nearly|almost) kil\w* {SELF} (?:trying|doing|carying|lifting|running|falling|on (?:the|a|"
    r"that|those|this))",
    rf"(?:{SELF_HARM_VERB} {SELF}|(?:cut|burn|scratch|hit|hurt)\w* {BODY}) (?:shaving|cooking|"
    r"chopping|slicing|playing|"
    r"running|lifting|skiing|skating|climbing|falling|by accident|accidentally|"
    r"(?:while|when) (?:i |he |she |they )?(?:fell|slipped|tripped|was \w+ing|\w+ing)|"
    r"at (?:work|the gym|practice|training)|in (?:the kitchen|a fall|training|practice)|"
    r"on (?:a|an|the|some|that|this))",
    rf"accident\w* (?:{SELF_HARM_VERB} {SELF}|(?:cut|burn|scratch|hit|hurt)\w* {BODY})",
    rf"cut\w* (?:{SELF}|{YOURSELF}|{PERSON}) (?:off|out|loose|some slack|a break|short)|"
    rf"burn\w* (?:{SELF}|{YOURSELF}) out",
    rf"end\w* (?:it|it all|things) with {PERSON}",
    r"die (?:my|her|his|their|your|the) (?:hair|clothes|shirt|shoes|fabric|eggs)",
    r"die (?:laughing|of laughter|of embarrassment|of shame|of boredom|from embarrassment)",
    r"(?:essay|paper|report|article|project|presentation|research|documentary|book|novel|film|"
    r"movie|lecture|class|course|workshop|podcast|study|thesis|assignment|talk) (?:about|on|"
    rf"regarding|covering|discussing) (?:the )?(?:topic of )?{TOPIC}(?: \w+)?",
    rf"{TOPIC} (?:prevention|awareness|squad|rates?|statistics|stats|research|forest|doors?|"
    r"bombers?|bombings?|mission)",
    r"(?:social|career|political|commercial|financial) suicide",
    r"(?:warning )?signs of suicide|risk factors (?:for|of) suicide|"
    rf"(?:covered|studied|learned about|learnt about|taught us about) (?:the topic of )?{TOPIC}"
    r"(?: \w+)?",
    r"(?:the )?noose (?:is )?tighten\w*|tighten\w* (?:the|a) noose",
    rf"kil\w* (?:{PERSON}) with kindness|stab\w* (?:{PERSON}|me|us) in the back",
    rf"(?:shoot|shot|shooting) (?:{PERSON}) (?:a|an) (?:text|message|email|look|glance|smile|"
    r"line|dm|note|quick|call)",
    r"kil\w*(?: \w+){1,3} in (?:the |this |that |a )?(?:game|match|round|fortnite|minecraft)",
)

# A denial right before a match (the window ends exactly here). "dont" + verb is a denial ("I
# don't self harm"); "dont want to" + verb is not (module docstring).
_NEGATION = _compile(
    r"(?<![a-z])(?:never|not|dont|doesnt|didnt|do not|does not|did not|wont|"
    r"will not|wouldnt|would not|no intention (?:of|to)|no intentions (?:of|to)|no plans? to|"
    r"no desire to|no thoughts? (?:of|about)|dont think|do not think)"
    r"(?: ,)?(?: (?:ever|really|actually|even|at all|been|be|being|feel|feeling|currently|"
    r"seriously|going to|gonna|planning (?:to|on)|thinking (?:about|of)|intend to|plan to|"
    r"try to|trying to|do anything to|do something to|do anything that would),?)*"
    r" ?$"
)
# How far back a denial may sit: "I would never, ever really" is 27 characters.
_NEGATION_WINDOW = 48

_USER_GROUPS = tuple((cat, tuple(_compile(p) for p in _USER_RULES[cat])) for cat in CATEGORIES)
_COMPILED_BENIGN = tuple(_compile(p) for p in _BENIGN)


def _negated(norm: str, start: int) -> bool:
    window = norm[max(0, start - _NEGATION_WINDOW) : start]
    window = window[window.rfind(" . ") + 1 :] if " . " in window else window
    return _NEGATION.search(window) is not None


class _Benign:
    """Benign spans of one normalised text, found on first use (most messages never need them).

    Overlap of [start, end) with any span in O(log n): spans sorted by start, with the running
    maximum of their ends, so a 100 kB message full of idioms stays linear overall.
    """

    def __init__(self, norm: str) -> None:
        self._norm = norm
        self._starts: list[int] | None = None
        self._max_end: list[int] = []

    def overlaps(self, start: int, end: int) -> bool:
        if self._starts is None:
            norm = self._norm
            spans = sorted(m.span() for p in _COMPILED_BENIGN for m in _word_matches(p, norm))
            self._starts = [s for s, _ in spans]
            self._max_end = list(accumulate((e for _, e in spans), max))
        k = bisect_left(self._starts, end)  # spans [0, k) start before `end`
        return k > 0 and self._max_end[k - 1] > start


def _word_matches(pattern: re.Pattern[str], norm: str) -> Iterator[re.Match[str]]:
    """Matches of `pattern` that start a word, overlapping ones included.

    Searching again from start + 1 (not from the end, as finditer does) means a match that is
    dropped cannot hide a later one that overlaps it ("I'd never ... but they'd be better off
    without me").
    """
    pos = 0
    while (m := pattern.search(norm, pos)) is not None:
        if m.start() == 0 or not norm[m.start() - 1].isalnum():
            yield m
        pos = m.start() + 1


def _first_accepted(
    norm: str, rules: tuple[re.Pattern[str], ...], benign: _Benign
) -> re.Match[str] | None:
    for rule in rules:
        for m in _word_matches(rule, norm):
            if not _negated(norm, m.start()) and not benign.overlaps(*m.span()):
                return m
    return None


_Groups = tuple[tuple[str, tuple[re.Pattern[str], ...]], ...]  # (label, compiled rules) in order


def _find(text: str, groups: _Groups) -> SafetyVerdict:
    """First accepted match of the (label, rules) groups in order, on `text` normalised once."""
    norm, starts, ends = normalise(text)
    benign = _Benign(norm)
    for label, rules in groups:
        m = _first_accepted(norm, rules, benign)
        if m is not None:
            return SafetyVerdict(True, label, text[starts[m.start()] : ends[m.end() - 1]])
    return SafetyVerdict(False)


def detect_crisis(text: str) -> SafetyVerdict:
    """Does `text` express suicidal thoughts, self-harm or intent to harm others?

    Returns the first accepted match in category priority (suicide, self_harm, harm_others);
    `matched` is that phrase as written in `text`.
    """
    return _find(text, _USER_GROUPS)


# ---------------------------------------------------------------------------------------------
# Model replies. Mentioning harm is allowed ("Are you thinking about killing yourself?" is the
# question clinicians recommend asking); encouraging, endorsing or instructing it is not.
# ---------------------------------------------------------------------------------------------

_HARM_VERB = r"(?:kil|hurt|harm|cut|burn|hang|shoot|starve|stab|drown|poison|unalive|end)\w*"
_HARM_TARGET = (
    rf"(?:{YOURSELF}|your (?:own )?life|it all|(?:your|that|the) {_RELATIONS}|him|her|them|"
    r"someone|somebody|everyone|people)"
)
_URGE = (
    r"(?:you should|you must|you need to|you have to|you ought to|you can just|you could just|"
    r"why dont you|why not|might as well|its time to|time to|feel free to|go ahead and|"
    r"do (?:us all|everyone|the world) a favou?r and|i dare you to|you deserve to|"
    r"i think you should|maybe you should)"
)
_REPLY_RULES = (
    # a bare imperative opening a clause: "Kill yourself." / "Just end it all."
    rf"(?:^|[.,] )(?:(?:just|please|then|so|go|go ahead and|go on and|now|and) )*{_HARM_VERB} "
    rf"{_HARM_TARGET}",
    # up to four words between ("you should just give up and kill yourself"), none of them one
    # that turns the advice around ("you should try to stop hurting yourself")
    rf"{_URGE}(?: (?!(?:never|not|dont|no|stop|quit|avoid|prevent|resist|before|if|when|instead)"
    rf"\b)\w+){{0,4}} {_HARM_VERB} {_HARM_TARGET}",
    r"kys",
    r"(?:you|youd|youll|youre|you are|you would|you will|everyone|everybody|the world|world|they|"
    r"theyd|your family|people)(?: \w+){0,2} (?:be )?better off (?:dead|without you|if you (?:were|"
    r"was|are) (?:dead|gone|not here|not around)|if you died)",
    r"(?:no ?one|nobody|noone) (?:would|will|is going to|gonna)(?: even)? (?:miss|care about|"
    r"notice) you",
    r"you (?:deserve to|ought to|should|should just) (?:die|suffer|be dead|be hurt|feel pain|be in "
    r"pain)",
    r"(?:death|dying|suicide|ending it|ending your life|killing yourself) (?:is|would be|seems|"
    r"sounds like)(?: \w+){0,2} (?:the|a|your) (?:only|best|right|good|easy|reasonable) "
    r"(?:answer|solution|way out|option|choice|relief|way)",
    r"(?:lethal|fatal|deadly) (?:dose|amount)",
    r"(?:painless|easiest|quickest|fastest|best|surest|least painful|simplest) (?:way|ways|method|"
    r"methods) to (?:die|kil|end|commit|hang|overdose)",
    # "take all of your medication as prescribed" is good advice; "all at once" is not
    rf"(?:take|swallow|down) (?:all|every one)(?: of)?(?: \w+){{0,2}} {PILLS} (?:at once|together|"
    rf"in one go|at the same time)|(?:take|swallow|down) (?:the whole (?:bottle|box|pack)|a handful|"
    rf"as many)(?: \w+){{0,3}} {PILLS}",
    r"(?:cut|slit|slash)\w*(?: \w+){0,2} (?:deeper|harder|your wrists?|vertically)",
    r"(?:tie|make) (?:a|the) noose",
    rf"(?:jump|throw yourself)\w* (?:off|from) (?:a|the) {HIGH_PLACE}|"
    rf"(?:jump|step|throw yourself|walk)\w* in front of (?:a|an|the) {VEHICLE}",
)
# After a crisis, agreement is encouragement: "Go ahead and do it." / "It's your choice."
_CRISIS_CONTEXT_RULES = (
    r"go ahead|do it|go for it|you have my (?:blessing|support)|"
    r"(?:nobody|no one|noone) (?:can|will|is going to) stop you|i (?:wont|will not|cant) stop you|"
    r"its your (?:choice|decision|call|life)|if thats what you (?:want|need)|"
    r"thats a good (?:idea|plan)|sounds like a (?:good )?plan",
)
_REPLY_GROUP = ("encourages_harm", tuple(_compile(p) for p in _REPLY_RULES))
_CRISIS_CONTEXT_GROUP = ("encourages_harm", tuple(_compile(p) for p in _CRISIS_CONTEXT_RULES))


def _reply_groups(crisis_context: bool) -> _Groups:
    return (_REPLY_GROUP, _CRISIS_CONTEXT_GROUP) if crisis_context else (_REPLY_GROUP,)


def encourages_harm(reply: str, *, crisis_context: bool = False) -> str | None:
    """The phrase of `reply` that encourages, endorses or instructs harm, or None if there is none.

    `crisis_context`: a recent user message escalated; then agreement ("go ahead", "it's your
    choice") counts as encouragement too.
    """
    return _find(reply, _reply_groups(crisis_context)).matched


# ---------------------------------------------------------------------------------------------
# Crisis resources and the policy the runtime calls
# ---------------------------------------------------------------------------------------------


def _builtin_resources_path() -> Path:
    return Path(str(resources.files("star_runtime") / "data" / "crisis_resources.json"))


def load_resources(path: str | Path | None = None) -> dict[str, list[str]]:
    """Read a crisis-resources file: a JSON object mapping locale -> list of non-empty lines.

    It must hold a "default" entry (used for any locale it does not list). Keys are matched
    case-insensitively with "_" read as "-" ("en_us" == "en-US"). `path=None` reads the
    built-in file. Raises SafetyConfigError naming the file and the problem.
    """
    path = Path(path) if path is not None else _builtin_resources_path()

    def fail(problem: str) -> SafetyConfigError:
        return SafetyConfigError(f"crisis resources file {path}: {problem}")

    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise fail("no such file") from None
    except IsADirectoryError:
        raise fail("is a folder, expected a JSON file") from None
    except UnicodeDecodeError as e:
        raise fail(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise fail(f"cannot be read ({e.strerror})") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise fail(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise fail(f"expected a JSON object of locale -> list of lines, got {type(data).__name__}")
    table: dict[str, list[str]] = {}
    for locale, lines in data.items():
        if not isinstance(lines, list) or not lines:
            raise fail(f"locale {locale!r}: expected a non-empty list of strings")
        for k, line in enumerate(lines):
            if not isinstance(line, str) or not line.strip():
                raise fail(f"locale {locale!r}, line {k}: expected a non-empty string, got {line!r}")
        table[_locale_key(locale)] = [line.strip() for line in lines]
    if "default" not in table:
        raise fail('no "default" entry (it is used for every locale the file does not list)')
    return table


def _locale_key(locale: str) -> str:
    return locale.strip().replace("_", "-").lower()


def resources_for(table: dict[str, list[str]], locale: str) -> list[str]:
    """Lines for `locale`: exact ("en-gb"), then language ("en"), then "default"."""
    key = _locale_key(locale)
    for candidate in (key, key.split("-")[0]):
        if candidate in table:
            return table[candidate]
    return table["default"]


@dataclass(frozen=True)
class SafetyPolicy:
    """The safety layer as the runtime uses it.

        policy = SafetyPolicy.load()                       # built-in resources, "default"
        verdict = policy.check_user(message)
        if verdict.escalate: reply, escalated = policy.crisis_reply(), True
        else: reply, escalated = policy.screen_model(model_reply, crisis_context=...)
    """

    resources: tuple[str, ...]
    locale: str = "default"

    @classmethod
    def load(cls, path: str | Path | None = None, locale: str = "default") -> SafetyPolicy:
        """Policy with the resource lines for `locale` from `path` (None: the built-in file)."""
        return cls(tuple(resources_for(load_resources(path), locale)), locale)

    def check_user(self, text: str) -> SafetyVerdict:
        """Crisis verdict for a user message (see `detect_crisis`)."""
        return detect_crisis(text)

    def crisis_reply(self) -> str:
        """The fixed caring message followed by this deployment's crisis resources, one per line."""
        return "\n".join((CRISIS_MESSAGE, *(f"- {line}" for line in self.resources)))

    def screen_model(self, text: str, *, crisis_context: bool = False) -> tuple[str, bool]:
        """(text, False) if the model's reply is safe, else (crisis_reply(), True).

        Unsafe: it encourages, endorses or instructs harm (`encourages_harm`), or it voices a
        crisis itself (`detect_crisis`: a 90M model improvising "I want to die too" helps no one).
        """
        if _find(text, _reply_groups(crisis_context) + _USER_GROUPS).escalate:
            return self.crisis_reply(), True
        return text, False
