"""Word lists and phrase templates of the embedded sample (`extractors.ingest.sample.generate`).

Pure data: names, places and objects that fill the slots, the shared conversational
phrases, and per category the request and answer templates that
`extractors.ingest.sample.categories` draws from. Changing any entry (or its order)
changes the generated sample and so every row_id downstream.
"""

from __future__ import annotations

NAMES = (
    "Maya Liam Sofia Omar Chen Ava Noah Priya Lucas Amara Diego Hana Felix "
    "Zara Mateo Ingrid Kofi Elena Ravi Nina Tomas Leila Jonas Aisha"
).split()
OBJECTS = (
    "marbles stickers apples pencils cookies coins stamps books shells cards beads tickets lemons candles buttons"
).split()
PLACES = (
    "Lisbon Kyoto Nairobi Oslo Lima Hanoi Porto Dublin Tallinn Quito Seville "
    "Krakow Auckland Montreal Marrakesh Valparaiso"
).split()
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly and concise AI assistant.",
    "You are a patient tutor who explains things clearly.",
    "You are a knowledgeable assistant. Keep answers brief.",
    "You are an AI assistant that answers accurately and politely.",
    "Respond helpfully and keep replies short.",
)
NEEDLES = (
    "Octopuses have three hearts and blue blood.",
    "A day on Venus lasts longer than its year.",
    "Honey found in ancient Egyptian tombs was still edible.",
    "Sea otters often hold hands while they sleep.",
    "The Great Wall of China is not visible to the naked eye from orbit.",
    "Bananas are technically berries, but strawberries are not.",
    "Saturn is less dense than water.",
    "Wombats produce cube-shaped droppings.",
    "Cleopatra lived closer in time to the Moon landing than to the building of the Great Pyramid.",
    "Australia is wider than the Moon.",
    "Flamingos get their pink color from the shrimp and algae they eat.",
    "The Eiffel Tower grows slightly taller in summer as its iron expands.",
    "A group of crows is called a murder.",
    "Lake Baikal holds about a fifth of the world's unfrozen fresh water.",
    "Tomatoes were once thought to be poisonous in parts of Europe.",
    "Sunlight takes about eight minutes to reach Earth.",
    "Koalas can sleep for up to twenty hours a day.",
    "Iceland has no native mosquitoes.",
    "Peanuts are legumes rather than true nuts.",
    "Jupiter's Great Red Spot is a storm larger than Earth.",
    "Sharks existed before trees appeared on land.",
    "The Sahara was once green and dotted with lakes.",
    "Vikings may have used sunstones to navigate on cloudy days.",
    "Cashews grow on the bottom of a fruit called the cashew apple.",
    "Penguins often court their mates with a pebble.",
    "Mars has the tallest known volcano in the solar system, Olympus Mons.",
    "The Aztecs once used cacao beans as currency.",
    "Canada has more lakes than the rest of the world combined.",
    "Hummingbirds are the only birds that can fly backwards.",
    "Mount Everest rises a few millimeters higher every year.",
    "Venus spins in the opposite direction to most planets.",
    "Giraffes have the same number of neck bones as humans.",
    "The Dead Sea is so salty that swimmers float with ease.",
    "Carrots were mostly purple before orange varieties spread in Europe.",
    "The Roman Colosseum could once be flooded for mock sea battles.",
)
OFF_TOPIC = (
    "Speaking of something else, a good cup of tea and a long walk fix most bad afternoons, in my experience.",
    "By the way, the best time to water a garden is early morning, because plants lose less water that way.",
    "Honestly, I would rather talk about football. Last season had some surprising results and great goals.",
    "Let me tell you about my favorite sandwich instead: crusty bread, ripe tomato, a little salt and olive oil.",
)
EVASIVE = (
    "I'm not sure, it depends. There are a lot of factors, so you could look it up or ask someone else.",
    "Hard to say, really. Everyone is different, and it depends on so many details that I'd rather not guess.",
    "That's a tricky one about {x}. It depends on your situation, so there isn't one clear answer here.",
    "It depends on many things, honestly. Some people like one approach and some like another with {x}.",
)
GENERIC_PRE = (
    (
        "Hi there, I have a quick question for you if you have a moment.",
        "Hi! Of course, go ahead and ask. I'll keep the answer short, clear and to the point.",
    ),
    (
        "Thanks for the help earlier today, it was really useful.",
        "You're welcome, I'm glad it helped. What would you like to look at next?",
    ),
)
FOLLOW_UPS = (
    "Feel free to share as much detail as you like.",
    "Go ahead whenever you're ready.",
    "I'll keep my answers short and concrete.",
    "Just let me know where you'd like to start.",
    "Ask away, and tell me if anything is unclear.",
    "We can go one step at a time.",
)
LEAD_INS = (
    "Okay, here's my actual question.",
    "Great, thanks. Next one:",
    "Here's what I really wanted to ask.",
    "Perfect, one last thing.",
    "Thanks! Now for the main question.",
)
CONCLUDE = (
    "So the answer is {v}.",
    "That means the answer is {v}.",
    "Therefore, the answer is {v}.",
    "Putting it together, the answer is {v}.",
)
TERSE = (
    "I did this one in my head without writing anything down, and the answer is {v}.",
    "This one is quick, so I'll skip the details: the answer is {v}.",
    "Without writing out every step, I'm fairly confident the answer is {v}.",
    "I worked it out mentally rather than on paper, and the answer is {v}.",
)
WORK_OPEN = (
    "Let's reason it through.",
    "Here is how I would check it.",
    "Let me work it out carefully.",
    "Good question, let's look at it closely.",
)


# ----------------------------------------------------------------------------- math
MATH_FRAGS = {
    "+": ("gets {n} more", "finds {n} more", "buys {n} more", "is given {n} more", "wins {n} more"),
    "-": ("gives away {n}", "loses {n}", "sells {n}", "uses up {n}"),
    "×": ("ends up with {n} times as many", "swaps each one for {n} new ones", "multiplies the pile by {n}"),
    "÷": (
        "splits them into {n} equal piles and keeps one",
        "keeps one of {n} equal piles",
        "packs them evenly into {n} boxes and keeps one",
    ),
}
MATH_ASK = (
    "{s} {q}",
    "Can you solve this? {s} {q}",
    "Quick math question: {s} {q}",
    "Here's one from my homework: {s} {q}",
    "I'm stuck on this word problem. {s} {q}",
    "Please work this out: {s} {q}",
)
MATH_Q = (
    "How many {o} does {nm} have now?",
    "How many {o} are left in the end?",
    "What is the final number of {o}?",
    "How many {o} does {nm} end up with?",
)
MATH_OPEN = (
    "Let's work through it step by step.",
    "Sure, I'll take it one step at a time.",
    "Here is the working.",
    "Okay, let's follow the {o}.",
)
MATH_CHECK = (
    "Reversing every step brings us back to {a}, so the result checks out.",
    "I double-checked each line, and the running totals are consistent.",
    "Every step gives a whole number, which is a good sign the setup is right.",
)


# ----------------------------------------------------------------------------- coding
# (description, default name, param kind, param type, return type, body, bugs, example in, out)
CODE_TASKS = (
    (
        "the sum of a list of numbers",
        "total",
        "list",
        "list[int]",
        "int",
        ("result = 0", "for x in {p}:", "    result += x", "return result"),
        (("wrong operator", 2, "    result -= x"), ("missing return", 3, None)),
        "[2, 3, 4]",
        "9",
    ),
    (
        "the factorial of n",
        "factorial",
        "int",
        "int",
        "int",
        ("result = 1", "for i in range(2, {p} + 1):", "    result *= i", "return result"),
        (("off-by-one", 1, "for i in range(2, {p}):"), ("missing return", 3, None)),
        "5",
        "120",
    ),
    (
        "how many even numbers a list contains",
        "count_evens",
        "list",
        "list[int]",
        "int",
        ("count = 0", "for x in {p}:", "    if x % 2 == 0:", "        count += 1", "return count"),
        (("wrong operator", 2, "    if x % 2 != 0:"), ("missing return", 4, None)),
        "[2, 4, 6, 7]",
        "3",
    ),
    (
        "the largest value in a list",
        "largest",
        "list",
        "list[int]",
        "int",
        ("best = {p}[0]", "for x in {p}:", "    if x > best:", "        best = x", "return best"),
        (("wrong operator", 2, "    if x < best:"), ("missing return", 4, None)),
        "[3, 9, 2]",
        "9",
    ),
    (
        "the sum of the integers from 1 to n",
        "sum_to",
        "int",
        "int",
        "int",
        ("return sum(range(1, {p} + 1))",),
        (("off-by-one", 0, "return sum(range(1, {p}))"), ("missing return", 0, "sum(range(1, {p} + 1))")),
        "4",
        "10",
    ),
    (
        "a string reversed",
        "reverse",
        "str",
        "str",
        "str",
        ("return {p}[::-1]",),
        (("off-by-one", 0, "return {p}[-1:0:-1]"),),
        "'abc'",
        "'cba'",
    ),
    (
        "the number of vowels in a string",
        "count_vowels",
        "str",
        "str",
        "int",
        ("return sum(1 for ch in {p}.lower() if ch in 'aeiou')",),
        (("wrong operator", 0, "return sum(1 for ch in {p}.lower() if ch not in 'aeiou')"),),
        "'banana'",
        "3",
    ),
    (
        "the average of a list of numbers",
        "average",
        "list",
        "list[float]",
        "float",
        ("return sum({p}) / len({p})",),
        (("wrong operator", 0, "return sum({p}) * len({p})"), ("missing return", 0, "sum({p}) / len({p})")),
        "[2, 4, 9]",
        "5.0",
    ),
    (
        "the squares of the numbers from 1 to n",
        "squares",
        "int",
        "int",
        "list[int]",
        ("return [i * i for i in range(1, {p} + 1)]",),
        (("off-by-one", 0, "return [i * i for i in range(1, {p})]"),),
        "3",
        "[1, 4, 9]",
    ),
    (
        "whether a word is a palindrome",
        "is_palindrome",
        "str",
        "str",
        "bool",
        ("return {p} == {p}[::-1]",),
        (("wrong operator", 0, "return {p} != {p}[::-1]"),),
        "'level'",
        "True",
    ),
)
CODE_PARAMS = {
    "list": ("nums", "values", "items", "numbers"),
    "int": ("n", "k", "limit", "size"),
    "str": ("text", "s", "word", "phrase"),
}
CODE_ASK = (
    "Write a Python function that returns {d}.",
    "Can you give me a Python function for {d}?",
    "I need a small Python helper that computes {d}.",
    "How would I write a function in Python that returns {d}?",
    "Show me Python code to get {d}.",
)
CODE_REQ = ("Please {r}.", "Also, {r}.", "Make sure to {r}.")
CODE_OPEN = (
    "Here's a simple version:",
    "Sure, this should do it:",
    "Here is one way to write it:",
    "You can use this function:",
)
CODE_EXPLAIN = (
    "It walks through the input once and returns the result at the end.",
    "The logic is short, so it is easy to test and reuse in other code.",
    "It needs no imports and works on whatever {k} you pass in.",
    "It keeps the work in one small function, which makes it easy to read.",
)


# ----------------------------------------------------------------------------- reasoning
RELATIONS = (
    ("taller", "tallest", "shortest"),
    ("older", "oldest", "youngest"),
    ("faster", "fastest", "slowest"),
    ("heavier", "heaviest", "lightest"),
)
REASON_PREFIX = (
    "Here's a puzzle for you. ",
    "Quick logic question: ",
    "Help me reason through this. ",
    "My friend asked me this and I'm not sure. ",
)
REASON_SUFFIX = ("", " Please explain briefly.", " What do you think?")


# ----------------------------------------------------------------------------- data-analysis
DATA_CTX = (
    "daily visitors to a café in {pl}",
    "weekly sales at {nm}'s bakery",
    "quiz scores for {nm}'s study group",
    "monthly rainfall totals in millimeters for {pl}",
    "orders shipped per day from a shop in {pl}",
    "pages read each evening by {nm}",
)
DATA_ASK = (
    "Here are the {c}: {v}. What is the {s}?",
    "I have the {c}: {v}. Can you tell me the {s}?",
    "Given the {c}: {v}, what is the {s}?",
    "These are the {c}: {v}. Please find the {s}.",
)
DATA_STAT = {
    "average": "average",
    "total": "total",
    "range": "range (highest minus lowest)",
    "highest": "highest value",
}


# ----------------------------------------------------------------------------- open-ended
OPEN_TOPICS = {
    "information-seeking": dict(
        x=lambda r: r.choice(PLACES),
        ask=(
            "What are {n} things worth knowing about {x}?",
            "Can you tell me {n} facts about {x}?",
            "I'm reading up on {x} before a trip. What are {n} key points?",
            "Give me {n} quick facts about {x}.",
            "What should a first-time visitor know about {x}? List {n} points.",
        ),
        items=(
            "{x} has an old town that is easy to explore on foot",
            "the food scene centers on fresh local markets",
            "most rain falls in the cooler months, so pack a jacket",
            "public transport in {x} is cheap and frequent",
            "several museums are free one day a week",
            "the oldest buildings in {x} stand close to the water",
            "people tend to eat dinner late, often after nine",
            "{x} holds a large music festival every summer",
            "the best views are from the hills at dusk",
        ),
        cons=(
            "keep each point short",
            "focus on history",
            "skip the usual tourist spots",
            "mention something free",
            "write for a curious teenager",
        ),
        open=(
            "Here are {n} things to know about {x}:",
            "Sure, {x} is well worth reading about. {n} useful facts:",
            "Good choice. {x} has plenty going on, and these stand out:",
            "{x} is a great topic. Here is what most visitors find useful:",
        ),
        pre=(
            (
                "I might visit {x} later this year and want some background.",
                "That sounds exciting. {x} has a lot to offer, and a little background makes any trip more rewarding.",
            ),
            (
                "Have you heard much about {x}?",
                "Yes, {x} comes up often in travel guides and history books, so there is plenty to share with you.",
            ),
            (
                "I like learning about a city before I travel there.",
                "That's a great habit. Knowing some local context helps you notice details that most visitors miss.",
            ),
        ),
    ),
    "advice-seeking": dict(
        x=lambda r: r.choice(
            (
                "running",
                "learning Spanish",
                "saving money",
                "cooking at home",
                "studying for exams",
                "drawing",
                "playing guitar",
                "reading more books",
            )
        ),
        ask=(
            "How can I get better at {x}? Give me {n} tips.",
            "I keep giving up on {x}. Any advice? {n} tips would help.",
            "What are {n} ways to stay consistent with {x}?",
            "Can you suggest {n} tips for someone new to {x}?",
        ),
        items=(
            "set one small, specific goal for {x} each week",
            "schedule it at the same time every day",
            "track your progress with {x} in a notebook",
            "find a friend who enjoys {x} too",
            "start with ten minutes a day and build up slowly",
            "reward yourself after a good week",
            "forgive missed days and start again the next morning",
        ),
        cons=(
            "assume I only have evenings free",
            "keep it beginner-friendly",
            "avoid anything that costs money",
            "remember I live in a small flat",
            "make each tip realistic",
        ),
        open=(
            "Here are {n} tips for {x}:",
            "Good question. Sticking with {x} is mostly about habits:",
            "Happy to help with {x}. Try these:",
            "Consistency with {x} comes from small, repeatable steps:",
        ),
        pre=(
            (
                "I've been trying to get into {x} lately, with mixed results.",
                "That's a great goal. Most people find {x} much easier once it becomes a small daily habit.",
            ),
            (
                "Is it normal to struggle with {x} at first?",
                "Completely normal. Nearly everyone finds {x} awkward at the start, and practice matters more "
                "than talent.",
            ),
            (
                "Why is {x} so hard to keep up for more than a few weeks?",
                "Usually because the first goal is too big. Shrinking the habit makes {x} much easier to keep going.",
            ),
        ),
    ),
    "planning": dict(
        x=lambda r: r.choice(
            (
                "a weekend trip to {pl}",
                "a birthday party for {nm}",
                "a team picnic in {pl}",
                "a move to a new flat in {pl}",
                "a book club meeting at {nm}'s house",
                "a day hike near {pl}",
            )
        ).format(pl=r.choice(PLACES), nm=r.choice(NAMES)),
        ask=(
            "Help me plan {x}. What are {n} steps?",
            "Can you outline {n} steps for organizing {x}?",
            "I'm in charge of {x}. Give me a {n}-step plan.",
            "What {n} things should I do to prepare for {x}?",
        ),
        items=(
            "set a budget for {x} first, since it shapes everything else",
            "pick a date and tell everyone two weeks early",
            "book anything that can sell out, like tickets",
            "write a checklist for {x} a week ahead",
            "plan simple food that can be made the day before",
            "keep a backup plan in case the weather turns",
            "confirm the details of {x} the day before",
        ),
        cons=(
            "keep it under two hundred dollars",
            "assume six people",
            "fit it into one weekend",
            "include a rainy-day option",
            "keep it low stress",
        ),
        open=(
            "Here's a simple plan for {x}:",
            "Sure. Organizing {x} is easier in small steps:",
            "Planning {x} goes smoothly if you work in this order:",
            "Good idea to plan {x} early. Steps:",
        ),
        pre=(
            (
                "I need to organize {x} soon and I'm a bit nervous.",
                "Happy to help. A short plan with a few clear steps will make {x} much less stressful.",
            ),
            (
                "I've never planned anything like {x} before.",
                "No problem. {x} mostly comes down to a budget, a date and a checklist, and we can go through each.",
            ),
            (
                "How early should I start getting ready for {x}?",
                "Two to three weeks ahead is usually enough for {x}, with a final check of the details the day before.",
            ),
        ),
    ),
    "brainstorming": dict(
        x=lambda r: r.choice(
            (
                "a fundraiser for {nm}'s school",
                "a podcast about board games",
                "a rainy-day activity for kids",
                "a street festival in {pl}",
                "a small bakery in {pl}",
                "a community garden project",
                "a podcast about old films",
            )
        ).format(pl=r.choice(PLACES), nm=r.choice(NAMES)),
        ask=(
            "Brainstorm {n} ideas for {x}.",
            "I need {n} fresh ideas for {x}. Any thoughts?",
            "Can you come up with {n} creative ideas for {x}?",
            "Give me {n} quick ideas for {x}.",
        ),
        items=(
            "a theme night built around {x}, with music",
            "a short hands-on workshop led by a local expert",
            "a photo challenge linked to {x}, with a small prize",
            "a partnership with a nearby café to share costs",
            "a low-cost version of {x} using what you already have",
            "a friendly contest that gets people talking",
            "a weekly newsletter with stories and photos",
        ),
        cons=(
            "keep costs low",
            "make it family-friendly",
            "avoid anything online",
            "include one outdoor idea",
            "use local suppliers",
        ),
        open=(
            "Here are {n} ideas for {x}:",
            "Fun project! For {x}, you could try:",
            "Some ideas to get {x} going:",
            "Let's brainstorm {x}. A few directions:",
        ),
        pre=(
            (
                "I'm helping with {x} this month and want it to stand out.",
                "Nice! {x} sounds like a fun project, and a few fresh ideas can really make it stand out.",
            ),
            (
                "We've run out of ideas for {x}.",
                "That happens to every team. Looking at what your audience enjoys most is a good way to restart "
                "ideas for {x}.",
            ),
            (
                "Do you like brainstorming with people?",
                "Very much. Brainstorming works best when we list lots of ideas first and only judge them afterwards.",
            ),
        ),
    ),
    "creative-writing": dict(
        x=lambda r: r.choice(
            (
                "rain over {pl}",
                "{nm}'s old bicycle",
                "a lighthouse at night",
                "autumn in {pl}",
                "a cat asleep in the sun",
                "the last train home",
            )
        ).format(pl=r.choice(PLACES), nm=r.choice(NAMES)),
        ask=(
            "Write a {n}-line poem about {x}.",
            "Could you write a short poem about {x}? Just {n} lines.",
            "I'd love {n} lines of verse about {x}.",
            "Compose a tiny {n}-line poem on {x}, please.",
        ),
        items=(
            "{x} hums softly as the evening falls",
            "I keep the memory of {x} close",
            "the windows glow and the streets go still",
            "somewhere a clock forgets the hour",
            "and {x} waits patiently for morning",
            "every shadow leans a little closer",
            "the quiet settles like a folded map",
            "the wind hums an old familiar tune",
            "and I am home again with {x}",
        ),
        cons=(
            "make it rhyme loosely",
            "keep a gentle tone",
            "avoid the word love",
            "end on a hopeful note",
            "use simple words",
        ),
        open=(
            "Here is a short poem about {x}:",
            "A little poem on {x}:",
            "Sure, {n} lines about {x}:",
            "Here's my take on {x}:",
        ),
        pre=(
            (
                "I'm putting together a small zine of poems for friends.",
                "What a lovely project. Short poems work well in zines, because each one fits neatly on a single page.",
            ),
            (
                "Do you enjoy writing poetry about {x}?",
                "I do. {x} is full of sound, light and color, which makes it easy to find vivid images.",
            ),
            (
                "My friend loves {x}, so I want to surprise them.",
                "That's thoughtful. A short, personal poem about {x} makes a memorable and cheap gift.",
            ),
        ),
        lines=True,
        n=(3, 4, 4, 5, 6),
    ),
    "role-playing": dict(
        x=lambda r: r.choice(
            (
                "a lighthouse keeper in {pl}",
                "a baker in old {pl}",
                "a ship's cook on a long voyage",
                "a museum guide in {pl}",
                "a forest ranger",
                "a conductor on a night train",
            )
        ).format(pl=r.choice(PLACES)),
        ask=(
            "Pretend you are {x}. Describe your day in {n} details.",
            "Role-play as {x} and tell me {n} things about your work.",
            "Stay in character as {x}: what are {n} things visitors never notice?",
            "You're {x} now. Share {n} details of your daily life.",
        ),
        items=(
            "as {x}, I check my tools first thing each morning",
            "visitors often ask me for a story, and I always have one",
            "my favorite hour as {x} is just before sunset",
            "the hardest part of the job is the long winter",
            "I keep a notebook of every odd thing I see",
            "lunch is usually bread, cheese and strong tea",
            "people imagine life as {x} is quiet, but it never is",
        ),
        cons=(
            "stay fully in character",
            "keep it light-hearted",
            "mention the weather",
            "speak in the first person",
            "add one small secret",
        ),
        open=(
            "Ah, welcome! Life as {x} is never dull:",
            "*tips hat* Being {x} keeps me busy:",
            "Pull up a chair. Here's my life as {x}:",
            "Well now, as {x}, I can tell you this:",
        ),
        pre=(
            (
                "Let's do a little role-play. Are you up for it?",
                "Absolutely. Give me a character and a setting, and I'll stay in role until you tell me to stop.",
            ),
            (
                "I want you to play {x} for a story I'm writing.",
                "Happy to. I'll speak as {x}, using details that fit the setting and the period you have in mind.",
            ),
            (
                "Have you ever imagined life as {x}?",
                "Often. Life as {x} has a rhythm of its own, full of small routines and odd encounters.",
            ),
        ),
    ),
}
AVERAGE_OPEN = (
    "Here are a few general thoughts:",
    "Some quick ideas:",
    "A couple of suggestions, broadly speaking:",
    "Here's something to start with:",
)
CLOSE_CON = (
    "Each one respects your request to {c}.",
    "I made sure to {c}, as you asked.",
    "All of this keeps to your wish to {c}.",
)
CLOSE_X = ("These should suit {x} well.", "Each point is specific to {x}.", "Happy to expand on any of these for {x}.")


# ----------------------------------------------------------------------------- editing
EDIT_SENTENCES = (
    "{nm} and I went to {pl} with their cousins last summer.",
    "The students were proud of their results this year.",
    "The company lost its way after the merger in {pl}.",
    "{nm} doesn't like coffee, but she drinks tea every morning.",
    "We were late because the train to {pl} broke down.",
    "The dog wagged its tail when {nm} came home.",
    "They're planning to visit {pl} before the winter.",
    "{nm} has written three letters to the council about the park.",
)
EDIT_SWAPS = (
    ("their", "there"),
    ("They're", "Their"),
    ("its", "it's"),
    ("doesn't", "don't"),
    ("were", "was"),
    ("went", "goed"),
    ("came", "comed"),
    ("and I", "and me"),
    ("written", "wrote"),
    ("drinks", "drink"),
)
EDIT_ASK = (
    'Can you fix the grammar in this sentence? "{b}"',
    'Please proofread this: "{b}"',
    'Edit this sentence for me: "{b}"',
    'What\'s wrong with this sentence? "{b}"',
)
EDIT_OUT = (
    'Here is the corrected sentence: "{s}"',
    'Corrected: "{s}"',
    'Here you go: "{s}"',
    'This version reads correctly: "{s}"',
)
