"""Events data: a GENERATED corpus of city service reports, split by template.

No real labelled corpus of city reports ships in any package (`../shared/DATA.md`), so this module
generates one, deterministically: the same seed always yields the same reports, and the manifest
records the seed, the generator version and a SHA-256 of every generated row (`generator_sha256`)
so a model version names exactly the corpus it was trained on. Treat the corpus as a stand-in for
real 311 traffic: it tests whether a model generalises to unseen phrasings, not how it fares on
real complaints.

How it is made hard:

- **Class mix** anchored to published NYC 311 complaint shares (`CLASS_SHARES`: noise is the
  largest, then illegal parking, heat/hot water, street condition, sanitation), plus the
  low-frequency emergencies the city must route fast (traffic accidents, power outages, fire
  hazards).
- **Templates**: 34 hand-written patterns per class (`TEMPLATES`), each with inline alternatives
  (``[a|b|c]``) and shared slots (``{addr}``, ``{time}``, ``{veh}``, ...). Many patterns carry words
  of another class (a hydrant in a parking complaint, a garbage truck in a noise complaint, a
  tree root in a sidewalk complaint), so single keywords do not decide the class.
- **Style**: shared openers and closers, slang (``pls``, ``u``, ``bc``), typos (swapped, dropped
  and doubled letters), lower/upper case, varied punctuation.
- **Two problems**: `TWO_PROBLEM_RATE` of reports mention a second problem of another class, in
  either order. The rule: **the more urgent class wins** (`URGENCY`, most urgent first: fire
  hazard, traffic accident, power outage, fallen tree, water/sewer, heat/hot water, street
  condition, sanitation, illegal parking, noise: life safety, then hazards to many people, then
  habitability, then nuisances).
- **Template-disjoint splits**: per class, `TEST_SHARE` (≥ 25%) of the templates are held out
  for `test` (the report subset ``template_disjoint``) and `VALID_SHARE` for `valid`
  (``holdout_templates``), so validation, too, measures unseen phrasings. A two-problem report
  draws both templates from its own split.

Priority rule (`priority_of`): a report is at least its classes' `BASE_PRIORITY` (fire hazard
emergency; traffic accident, power outage, fallen tree, water/sewer high; the rest normal); an
emergency cue (sparks, someone trapped or hurt, gas, smoke: `EMERGENCY_CUES`) makes it
`emergency`, a vulnerability or escalation cue (a newborn, an oxygen machine, days without heat:
`HIGH_CUES`) at least `high`. Cue phrasings are shared by all splits; the model must notice them.

A user's own corpus (CSV or Parquet) has the columns `text`, `label` (one of `LABELS`),
`priority` (one of `PRIORITIES`) and `template` (any id grouping reports that share wording, e.g.
the form or campaign they came from); it is split by template the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from core.errors import DataError
from domains.tables import Kind, read_user_file, validate_frame, write_splits

DOMAIN = "events"
LABELS: tuple[str, ...] = (
    "noise", "illegal_parking", "street_condition", "sanitation", "water_sewer",
    "power_outage", "traffic_accident", "fire_hazard", "heat_hot_water", "fallen_tree",
)
PRIORITIES: tuple[str, ...] = ("normal", "high", "emergency")  # ascending urgency
URGENCY: tuple[str, ...] = (  # most urgent first: the winner when a report mentions two problems
    "fire_hazard", "traffic_accident", "power_outage", "fallen_tree", "water_sewer",
    "heat_hot_water", "street_condition", "sanitation", "illegal_parking", "noise",
)
BASE_PRIORITY: dict[str, str] = {
    "fire_hazard": "emergency",
    "traffic_accident": "high", "power_outage": "high", "fallen_tree": "high", "water_sewer": "high",
    "heat_hot_water": "normal", "street_condition": "normal", "sanitation": "normal",
    "illegal_parking": "normal", "noise": "normal",
}
# Shares of NYC 311 service requests among these ten kinds (noise of all sorts ~ a quarter,
# illegal parking and blocked driveways next, then heat/hot water ...), rounded; emergencies rare.
CLASS_SHARES: dict[str, float] = {
    "noise": 0.25, "illegal_parking": 0.19, "heat_hot_water": 0.14, "street_condition": 0.10,
    "sanitation": 0.10, "water_sewer": 0.07, "fallen_tree": 0.045, "traffic_accident": 0.04,
    "power_outage": 0.035, "fire_hazard": 0.03,
}

GENERATOR_VERSION = 1
DEFAULT_SEED = 311
SIZES: dict[str, dict[str, int]] = {
    "full": {"train": 6000, "valid": 900, "test": 2000},
    "smoke": {"train": 160, "valid": 60, "test": 80},
}
SPLITS = ("train", "valid", "test")
TEST_SHARE = 0.28  # of each class's templates, held out for `test` (the issue asks >= 25%)
VALID_SHARE = 0.15  # of each class's templates, held out for `valid`
TWO_PROBLEM_RATE = 0.12
EMERGENCY_CUE_RATE = 0.15  # for classes with emergency cues
HIGH_CUE_RATE = 0.20  # for classes with high cues, when no emergency cue was added
OPENER_RATE, CLOSER_RATE = 0.5, 0.5
SLANG_RATE, TYPO_RATE = 0.2, 0.25
LOWER_RATE, UPPER_RATE = 0.35, 0.05

COLUMNS = ["text", "label", "priority", "template", "second_label", "second_template"]
USER_COLUMNS: dict[str, Kind] = {"text": "str", "label": "str", "priority": "str", "template": "str"}

# fmt: off
TEMPLATES: dict[str, tuple[str, ...]] = {
    "noise": (
        "the [people|neighbors|tenants] [upstairs|next door|in {apt}] [are blasting|keep blasting] music {time}",
        "loud party at {addr}, [bass|speakers|subwoofer] shaking my windows",
        "dogs barking nonstop [in the yard|on the balcony|next door] for {dur}",
        "construction crew [jackhammering|drilling|banging] {time}, way outside permitted hours",
        "can't sleep, someone is [revving|racing] [motorcycles|dirt bikes|a car with no muffler] up and down {street}",
        "ice cream truck jingle on repeat outside {addr} for {dur}",
        "bar on {street} has [a live band|a dj|speakers] going past midnight, whole block can hear it",
        "car alarm [going off|has been going off] [on and off|nonstop] {time}",
        "[guy|someone] on the corner with a [bluetooth speaker|boombox] [screaming lyrics|yelling] {time}",
        "constant [stomping|thumping|banging] from the apartment above, sounds like [furniture being dragged|bowling]",
        "[leaf blowers|a generator|an air compressor] roaring behind {addr} {time}",
        "restaurant's rooftop [ac unit|exhaust fan] hums so loud my [walls vibrate|ears ring]",
        "[fireworks|m80s] going off [every few minutes|all night] near {place}",
        "[people|a crowd] [yelling and fighting|screaming and laughing] in the [courtyard|hallway] {time}",
        "a neighbor practicing [drums|trumpet|electric guitar] {time} every night",
        "delivery trucks idling and [beeping|honking] outside {addr} {time}",
        "[honking|horns blaring] nonstop at the intersection of {street} and {street2}",
        "i can hear every word of the [songs|karaoke] from the club on {street} {time}",
        "landlord's contractors [sanding floors|tearing down walls] {time} on a sunday",
        "the garbage truck [slams|bangs] dumpsters {time} every single night, wakes the whole block",
        "[loud|noisy] [tv|stereo] through the wall, [neighbor|tenant] won't turn it down",
        "block party with a [dj|sound truck] and no permit on {street}",
        "someone [hammering|drilling|sawing] [nonstop|for hours] in {apt}",
        "[music|bass] from a car parked outside {addr} [rattling my walls|shaking the windows] {time}",
        "rooster crowing {time} in the backyard of {addr}",
        "[upstairs|downstairs] unit [partying|screaming] {time}, [3rd|5th] time this week",
        "the [lounge|hookah bar] on {street} keeps its doors open, [speakers|music] [blaring|booming] outside",
        "[drag racing|street racing] with [screeching tires|exhausts popping] on {street} {time}",
        "the [gym|dance studio] downstairs is [shaking the floor|way too loud] with [weights dropping|music]",
        "street vendor [blasting|shouting] through a megaphone at {place}",
        "store's security alarm [ringing|going off] [for {dur}|{time}] and nobody shuts it off",
        "[neighbors|people] [arguing|shouting] loudly in the hallway {time}",
        "even earplugs don't help, [subwoofer|bass] pounding through the floor {time}",
        "[kids|teens] bouncing a ball against my wall {time}, [thud thud thud|nonstop banging]",
    ),
    "illegal_parking": (
        "[car|{veh}] parked [in front of|blocking] my driveway at {addr}, can't get out",
        "{veh} double parked on {street} [for {dur}|{time}], traffic backed up",
        "someone parked in the bike lane on {street} again",
        "[car|{veh}] blocking the fire hydrant outside {addr}",
        "cars parked on the sidewalk near {place}, strollers have to go in the street",
        "{veh} [sitting|parked] in the bus stop at {street} and {street2}, buses can't pull in",
        "[no plates|expired plates|temp tags] {veh} parked at {addr} for [weeks|{dur}]",
        "[commercial|box] truck parked overnight on a residential block, {street}",
        "somebody took the handicapped spot [with no placard|without a permit] at {place}",
        "my driveway is blocked AGAIN. [gray|white|black] [sedan|pickup], {addr}",
        "{veh} parked in the crosswalk at {street} and {street2}, [kids|people] walking around it",
        "cars parked in the [no standing|loading] zone [all day|{time}] on {street}",
        "[abandoned|burned out|stripped] car [left|sitting] on {street} [for {dur}|since last month]",
        "taxi drivers parking [on the corner|in the turn lane] at {place} on their break",
        "[dealership|mechanic shop] keeps storing cars on the street outside {addr}",
        "[van|truck] parked across the [curb cut|wheelchair ramp] at {street}",
        "[parents|drivers] parking in the [school zone|drop off lane] at {place} during pickup",
        "car left [halfway|right] in the [intersection|turn lane] at {street2} [for {dur}|{time}]",
        "[street cleaning|alternate side] day and the same {veh} never moves, {addr}",
        "food truck parked on the sidewalk all day blocking the [entrance|view] at {place}",
        "[blocked|obstructed] driveway, need to leave for work, plate [ABC1234|KXJ 4410|HPN-2291]",
        "idling {veh} parked in the fire lane outside {place}",
        "[trucks|vans] triple parked [unloading|making deliveries] on {street}, nobody can pass",
        "someone put cones out to [save|reserve] a parking spot on {street} [for {dur}|all week]",
        "[boat trailer|rv|camper] parked on {street} for [a month|{dur}]",
        "car with [a boot|a pile of tickets] [sitting|left] in the [loading zone|bus lane] on {street}",
        "[construction workers|contractors] park their trucks on the sidewalk every day at {addr}",
        "{veh} parked [facing the wrong way|on the median|on the grass] at {place}",
        "can't get my [car|van] out, someone [boxed me in|parked inches from my bumper] across my driveway",
        "placard abuse, cars [parked|sitting] on the sidewalk all [day|week] near {place}",
        "a [car|{veh}] is [left|parked] in the [citi bike|bike share] dock area on {street}",
        "[motorcycles|scooters|mopeds] parked blocking the building entrance at {addr}",
        "[cars|vehicles] [parked|sitting] in the bus lane at {street} and {street2} every morning",
        "my neighbor keeps parking [across|in front of] my garage door at {addr}",
    ),
    "heat_hot_water": (
        "no heat in {apt} [{time}|for {dur}], radiators are ice cold",
        "we have no hot water at {addr} [for {dur}|{time}]",
        "landlord [turned off|shut off|won't turn on] the heat, it's freezing in here",
        "[radiator|heater] [not working|stone cold|dead] in my [bedroom|living room|kids room]",
        "only [cold|lukewarm] water comes out of the [shower|tap|faucet] at {addr}",
        "apartment is [48|52|55] degrees inside, [we're wearing coats|can see my breath]",
        "the boiler in my building [is broken|keeps breaking|went out] again, {addr}",
        "heat comes on for an hour then shuts off, [all week|for {dur}]",
        "[super|management] says [the part is on order|they're working on it] but still no heat after {dur}",
        "using the oven to [stay warm|heat the apartment], landlord [ignores us|won't answer]",
        "hot water runs out after [two minutes|five minutes] every morning in {apt}",
        "whole building freezing, [tenants|neighbors] [all complaining|using space heaters], {addr}",
        "the [pipes|radiators] [clank|bang] but never get warm, {apt}",
        "shower is freezing cold, no hot water for {dur}",
        "[thermostat|heat] stuck at [58|60|62] even though it's [below freezing|20 degrees] outside",
        "no hot water to [bathe|wash] my [baby|kids] at {addr}",
        "heat off [overnight|every night] in {apt}, [landlord|management] saving money",
        "we've been boiling water on the stove [to wash|for baths] because the water heater is broken",
        "[inadequate|insufficient] heat in {apt}, temperature in unit way below legal minimum",
        "cold air [coming out of|blowing from] the vents, heating system [broken|busted]",
        "radiator valve broken, the room never warms up",
        "[hot water|heat] outage in the whole building at {addr} {time}",
        "[my kids|we] are sleeping in [jackets|coats|hats] because there's no heat",
        "landlord [says|claims] the heat is on but [my thermometer says|it's] [50|53] in the apartment",
        "[faucet|sink] only gives cold water, [kitchen and bathroom|both bathrooms] in {apt}",
        "heat [hasn't worked|has been out] since [the storm|last tuesday] in {apt}",
        "[oil|fuel] delivery never came and the building has no heat, {addr}",
        "cold apartment complaint: [no heat|heat barely on] [during the day|at night] for {dur}",
        "the super ran out of [oil|fuel] again, [no heat or hot water|freezing apartments]",
        "need an inspector: [my unit|{apt}] has had no heating [this winter|since november]",
        "[water heater|hot water heater] [broke|died] and [management|the landlord] won't replace it",
        "[baseboard heaters|radiators] [cold|off] on the top floor, ice cold {time}",
        "it's colder inside my apartment than outside lol, {addr} no heat",
        "washing dishes in cold water [for {dur}|{time}], building hot water [broken|off]",
    ),
    "street_condition": (
        "huge pothole on {street} near {place}, [blew my tire|swallowed my wheel]",
        "[pothole|crater] in the [middle|right lane] of {street} [getting bigger|growing] every day",
        "the road on {street} is [cracked|crumbling|buckled] for a whole block",
        "[manhole cover|steel plate] [sticking up|loose|rattling] on {street} at {street2}",
        "[sidewalk|curb] [cracked|broken|uneven] outside {addr}, people trip on it",
        "[faded|missing] crosswalk lines at {street} and {street2}, drivers don't stop",
        "[road|asphalt] [sinking|has a dip] near {addr}",
        "[utility|con ed] crew [dug up|cut open] the street and left it [unpaved|a mess] for {dur}",
        "[deep|big] rut in the bike lane on {street}, [cyclists swerving|almost fell]",
        "[loose gravel|broken asphalt] all over {street} after the repaving",
        "the speed bump on {street} is [destroyed|torn up], [cars scraping|chunks missing]",
        "[cobblestones|pavers] [coming loose|missing] on {street}",
        "the street [is full of potholes|looks like the moon] between {street} and {street2}",
        "[trench|patch] [not filled|sunken] after the [construction|water work] outside {addr}",
        "[pothole|hole] right at the crosswalk at {place}, [wheelchairs|strollers] can't get through",
        "[raised|lifted] sidewalk slab from tree roots in front of {addr}",
        "[pavement|road surface] [breaking up|cracking apart] on the {street} [overpass|bridge]",
        "[missing|broken] [curb|guard rail] along {street}, [dangerous|sketchy] at night",
        "black ice patch that never gets salted on {street}",
        "someone please patch the [potholes|holes] on {street}, [3rd tire|two rims] this month",
        "road [caved|sunk] [around|next to] a drain on {street}",
        "lane markings [completely worn|gone] on {street}, people driving in the wrong lane",
        "road plates left over {street} [shifting|clanging] when cars go over",
        "bumpy [broken|cracked] road by {place}, my car [shakes|rattles] every time",
        "[sidewalk|pavement] caved in [in front of|near] {addr}, a hole you could fall in",
        "[pothole|hole] filled with rain on {street}, [can't see how deep|a car got stuck]",
        "[asphalt|road] [melting|rippling|wavy] on {street}",
        "[curb ramp|pedestrian ramp] at {street} and {street2} is [crumbled|broken]",
        "[giant|massive] pothole near {place}, {street} eastbound, [lane is unusable|cars swerving]",
        "road defect report: {street} near {addr}, [multiple|several] [potholes|cracks]",
        "the [bridge|overpass] expansion joint on {street} is [broken|sticking up]",
        "a [hole|gap] in the road where the repair crew [never finished|abandoned the job]",
        "pothole so deep on {street} it [bent my rim|knocked my bumper off]",
        "[uneven|broken] pavement at {place}, [bikers|scooters] keep wiping out",
    ),
    "sanitation": (
        "garbage [hasn't been picked up|was skipped|was missed] on {street} [for {dur}|this week]",
        "[trash|garbage] [bags|piles] [piled up|overflowing] in front of {addr}",
        "[rats|mice|roaches] all over the [trash|garbage] at {place}",
        "[overflowing|full] [litter basket|public trash can] at {street} and {street2}",
        "someone [dumped|left] [a mattress|a couch|construction debris] on the sidewalk at {addr}",
        "[recycling|compost] [not collected|missed again] on {street}",
        "[dog poop|dog waste] all over the sidewalk on {street}, nobody cleans it",
        "illegal dumping in the [vacant lot|alley] [behind|next to] {addr}",
        "[restaurant|store] leaves [food waste|grease bags] out on the curb overnight, {street}",
        "[litter|trash] everywhere in {place}, [smells|stinks] terrible",
        "[dead rat|dead pigeon|dead cat] on the sidewalk outside {addr}",
        "landlord never puts the bins out, [garbage room|basement] overflowing",
        "[needles|syringes|broken bottles] [in the trash|scattered] near {place}",
        "street sweeper [skips|missed] {street}, trash piled in the gutter",
        "bulk item pickup never came for {dur}",
        "[smelly|stinking] dumpster [overflowing|open] behind {place}, [flies|maggots] everywhere",
        "the sanitation truck [spilled|left] [garbage|trash] all over the street on {street}",
        "[old tires|car parts] dumped on {street}",
        "block covered in [trash|litter] after the [street fair|block party] on {street}",
        "[bins|trash cans] [knocked over|tipped] and garbage blowing down {street}",
        "[unsanitary|filthy] conditions in front of {addr}, [garbage|trash] [for {dur}|everywhere]",
        "[raccoons|rats] ripping open trash bags every night at {addr}",
        "missed collection: [{addr}|{street}], [bags|cans] out {time}",
        "the vacant lot on {street} is full of [garbage|junk] and [weeds|rats]",
        "[cigarette butts|takeout containers] piling up outside {place}",
        "[someone|a contractor] [dumping|left] [paint cans|renovation debris] by the curb at {addr}",
        "garbage chute [clogged|jammed] in my building, bags in the hallway",
        "[smell|stench] of rotting [garbage|food] coming from the corner on {street}",
        "[old tvs|broken appliances] left on the sidewalk by {addr}",
        "[park|playground] [trash cans|bins] haven't been emptied [in {dur}|all week] at {place}",
        "[leaf bags|yard waste] sitting uncollected on {street} [for {dur}|{time}]",
        "curb [full of|clogged with] [trash|garbage] along {street}",
        "[flies|maggots] in the trash room of {addr}, [super|landlord] does nothing",
        "people toss [garbage|trash bags] out the window into the [yard|alley] at {addr}",
    ),
    "water_sewer": (
        "water main [break|burst] on {street}, water [gushing|shooting] into the street",
        "[sewer|sewage] [backing up|backed up] into [my basement|the building] at {addr}",
        "[catch basin|storm drain] [clogged|blocked] on {street}, [street floods|huge puddle] every time it rains",
        "[fire hydrant|hydrant] [leaking|open|running] outside {addr} [for {dur}|{time}]",
        "[brown|rusty|discolored] water coming out of the [taps|faucets] at {addr}",
        "[no water|no water pressure|water shut off] in [the building|{apt}] [{time}|for {dur}]",
        "[sewer smell|sewer gas smell] [coming from|rising from] the manhole on {street}",
        "water [bubbling up|seeping] through the [pavement|sidewalk] near {addr}",
        "manhole [overflowing|spilling] [sewage|dirty water] onto {street}",
        "intersection [flooded|under water] at {street} and {street2}, drains not working",
        "[a pipe burst|pipe burst] in the [basement|wall] at {addr}, water everywhere",
        "[low|weak] water pressure [all day|for {dur}] on {street}, [can barely shower|faucets trickle]",
        "sewer grate covered with [leaves|garbage], water pooling at the corner",
        "tap water [smells|tastes] [like chlorine|like rotten eggs|weird] at {addr}",
        "[toilet|toilets] [backing up|overflowing] from the main line in {apt}",
        "a stream of water running down {street} [for hours|from nowhere], must be a broken pipe",
        "[water meter|curb valve] [leaking|spraying] in front of {addr}",
        "[basement|cellar] fills up from the street drain every time it rains, {addr}",
        "[sinkhole|hole] forming where water keeps leaking on {street}",
        "raw sewage [in the street|on the sidewalk] outside {place}",
        "[open|uncapped] hydrant [kids playing in it|wasting water] on {street} {time}",
        "[puddle|pool of water] that never dries, even without rain, at {addr}",
        "water [shut off|turned off] [without notice|with no warning] on {street}",
        "[gurgling|bubbling] drains and a sewage smell in {apt}",
        "[catch basin|storm drain] [collapsed|has a broken grate] at {street} and {street2}",
        "[geyser|fountain] of water shooting from the ground near {place}",
        "[leaking|broken] service line soaking the sidewalk at {addr}",
        "[cloudy|milky] [drinking water|tap water] in {apt} [{time}|for {dur}]",
        "sewage overflow [again|for the second time this week] at {addr}",
        "water spraying from a valve under the sidewalk on {street}",
        "flooding across the road at {place}, [drain covered|drain won't take it]",
        "hydrant leak near {place}, [ice forming|water everywhere]",
        "[foul|nasty] odor from the catch basin [all week|for {dur}] on {street}",
        "[no water|water outage] for the whole block on {street}, [no notice|no info]",
    ),
    "power_outage": (
        "[power|electricity] [out|went out] [in the whole building|on our block] at {addr} [{time}|for {dur}]",
        "blackout on {street}, all the [lights|windows] are dark",
        "lights [flickering|keep flickering] [on and off|all night] at {addr}",
        "transformer on the pole blew with a loud bang near {street}, [lost power|no power]",
        "no [electricity|power] in [{apt}|the building], con ed says [no ETA|{dur}]",
        "half of the [apartment|building] has no power, [outlets|lights] dead",
        "[street lights|street lamps] out along {street}, [pitch black|completely dark]",
        "brownout at {addr}, [lights dim|appliances turning off]",
        "elevators stopped because the power is out at {addr}",
        "fridge [dead|off] and [food spoiling|everything thawing], no power [for {dur}|{time}]",
        "neighborhood wide [outage|blackout] around {place}, no stores open",
        "[power|electric] keeps cutting out [every few hours|every night] on {street}",
        "[lost power|power went out] right after [the storm|the thunder], {addr}",
        "[traffic signals|traffic lights] dark at {street} and {street2} because of the outage",
        "[building|apartment] dark and the hallway lights [out too|not working] at {addr}",
        "no [power|electricity] since the utility [worked on|dug up] {street}",
        "the power is out but the building across the street still has it",
        "my [medical equipment|cpap machine] won't run because there's no power at {addr}",
        "outage ongoing for {street}, no lights no internet for {dur}",
        "[wires|power lines] sagging and the power going in and out at {addr}",
        "breaker trips for the whole floor, management says it's the utility",
        "the block went dark {time}, [hearing generators|no lights anywhere]",
        "partial power: [some outlets work|lights work] but the [stove|ac] won't turn on",
        "[con ed|the power company] [cut|shut off] our power [by mistake|without notice] at {addr}",
        "we've been [without|w/o] [power|electricity] [for {dur}|{time}] and nobody is answering",
        "lights out in the [lobby|stairwell] and the apartments too at {addr}",
        "power surge [fried|blew out] [appliances|my tv] then everything went dark, {addr}",
        "electric meter [dark|blank] and nothing works in {apt}",
        "substation [humming|buzzing] and then the power died on {street}",
        "total darkness on {street}, the whole grid is down",
        "[power|electricity] came back for an hour then died again at {addr}",
        "[outage|blackout] hitting the senior center near {place}",
        "no power for several [buildings|blocks] around {street} and {street2}",
        "electricity gone {time}, [phone dying|can't charge anything], {addr}",
    ),
    "traffic_accident": (
        "[car accident|crash|collision] at {street} and {street2}, [two cars|a car and a truck] involved",
        "{veh} [rear ended|hit] [another car|a parked car] on {street}",
        "[pedestrian|a woman|a man] [hit|struck] by {veh} near {place}",
        "[cyclist|delivery guy on a bike] [got hit|knocked off] by {veh} on {street}",
        "fender bender blocking the [left lane|intersection] at {street}",
        "[three car|chain reaction] pileup on {street} by {place}",
        "{veh} [crashed into|slammed into] a [light pole|storefront|fence] on {street}",
        "hit and run [just now|{time}] at {addr}, driver took off down {street}",
        "car [flipped over|on its side] near {street} and {street2}",
        "[motorcycle|moped|scooter] [crash|wreck] on {street}, rider on the ground",
        "[school bus|city bus] [collided with|hit] a [car|taxi] at {place}",
        "wreck with [glass|car parts] all over {street}",
        "two cars [collided|crashed] [head on|at the light] on {street}",
        "[car|{veh}] jumped the curb and hit [a bench|a hydrant|a bus shelter] at {place}",
        "[taxi|uber|cab] vs [cyclist|pedestrian] collision near {street2}",
        "car [skidded|spun out] [on the ice|in the rain] and hit [a wall|another car] on {street}",
        "a driver [backed into|reversed into] [my car|a car] and [drove off|left] outside {addr}",
        "delivery truck [sideswiped|clipped] [a car|several parked cars] on {street}",
        "crash just happened right outside {addr}, [airbags went off|cars smashed]",
        "collision involving [a police car|an ambulance|a fire truck] at {street} and {street2}",
        "[car|suv] ran the red light and [t-boned|hit] [another car|a van] at {place}",
        "accident on the expressway ramp near {street}, [traffic stopped|lanes closed]",
        "[kid|teenager] on a [scooter|bike] clipped by a car outside {place}",
        "[drunk driver|speeding car] [crashed|wrecked] into parked cars on {street} {time}",
        "collision between {veh} and a [bus|truck] shutting down {street}",
        "[car|{veh}] [hit|ran over] a [dog|pedestrian] and kept going on {street}",
        "wreck at {street} & {street2}, cars totaled, [police not here yet|no cops yet]",
        "car went off the road and into the [ditch|embankment] near {place}",
        "minor crash but the drivers are [blocking traffic|fighting] at {street}",
        "[van|truck] smashed into the front of a [building|store] at {addr}",
        "[car|vehicle] hit a [cyclist|bike rider] [in the bike lane|at the crosswalk] on {street}",
        "[car|{veh}] wrecked and leaking [fluid|oil] at {street} and {street2}",
        "[bad|serious] accident by {place}, cars [mangled|crushed]",
        "[my car|a car] got hit while parked at {addr} and the other driver [fled|took off]",
    ),
    "fire_hazard": (
        "[smoke|black smoke] [coming out of|pouring from] [the window|the roof] at {addr}",
        "[smell|strong smell] of gas [in the hallway|in the building|on the street] at {addr}",
        "[fire|flames] [in|coming from] [a dumpster|a garbage can] behind {place}",
        "sparks coming out of [an outlet|the wall socket|the fuse box] in {apt}",
        "fire escape [blocked|chained shut|locked] at {addr}",
        "[burning smell|smell of burning] from [the basement|the vents|the walls] at {addr}",
        "[car|{veh}] [on fire|burning] on {street}",
        "[space heater|extension cord] [melting|smoking] in {apt}",
        "[illegal|unsafe] [bonfire|grill] [on the roof|in the hallway] at {addr}",
        "[gas|propane] tanks stored [in the basement|on the sidewalk] at {place}",
        "[smoke alarm|fire alarm] going off and [smoke|haze] in the hallway at {addr}",
        "electrical wires [melting|burning] [in the ceiling|behind the wall] in {apt}",
        "flames [visible|seen] on the [top floor|roof] of {addr}",
        "kitchen fire [next door|in {apt}] [spreading|won't go out]",
        "[brush|grass|vacant lot] fire near {place}, getting bigger",
        "hoarder apartment stuffed with [newspapers|junk] next to the boiler at {addr}",
        "[explosion|loud boom] and then [smoke|fire] near {place}",
        "manhole [smoking|shooting flames] on {street}",
        "[fireworks|kids] started a fire in the [park|lot] near {place}",
        "[electrical panel|breaker box] [sparking|buzzing and smoking] in the [basement|laundry room] at {addr}",
        "[gas leak|leaking gas] hissing from [the meter|the stove] at {addr}",
        "restaurant [exhaust|hood] [on fire|flaming] at {place}",
        "[people|someone] [burning|setting fire to] trash [in the alley|in a barrel] at {addr}",
        "[padlocked|locked] emergency exit at the [club|warehouse party] on {street}, hundreds inside",
        "[smoke|smoky haze] filling the [stairwell|hallway] at {addr}, can't tell where from",
        "[candle|cigarette] fell and the [curtains|couch] are smoking in {apt}",
        "a tree [caught fire|is burning] from [a lightning strike|sparks] near {place}",
        "fire on the [subway tracks|elevated tracks] near {place}",
        "[power strips|extension cords] hot to the touch and [burning|scorched] in the store at {addr}",
        "[fumes|smoke] pouring from a vent at {addr}, smells like burning plastic",
        "[car|{veh}] engine caught fire at the gas station near {place}",
        "[shed|garage] [on fire|burning] behind {addr}",
        "boiler [making smoke|backfiring flames] in the basement at {addr}",
        "[i see|there's] a fire near {place}, [please hurry|send the fire department]",
    ),
    "fallen_tree": (
        "[tree|big tree] [fell|came down] across {street}, [blocking traffic|road blocked]",
        "[large|huge] [branch|limb] [fell|broke off] onto [a parked car|my car|the sidewalk] at {addr}",
        "tree [leaning|tilting] dangerously [over|toward] [the house|the street] at {addr}",
        "[tree|branches] [down|fell] on the power lines on {street}",
        "[uprooted|toppled] tree in {place} after the [storm|wind]",
        "[dead|rotten] tree [about to fall|cracking] in front of {addr}",
        "[hanging|dangling] limb over the [sidewalk|playground] near {place}",
        "tree [split|cracked in half] [in the storm|last night] on {street}",
        "[broken|fallen] branches all over {street}, [cars can't pass|can't walk through]",
        "a tree [fell|came down] onto [my house|the roof|the fence] at {addr}",
        "the wind knocked down [a tree|two trees] by {place}",
        "[huge oak|london plane tree] [blocking|across] the [driveway|entrance] at {addr}",
        "branch resting on the wires over {street}, could fall any second",
        "street tree ripped out by the roots and lying on its side on {street}",
        "[fallen|downed] tree [in the bike lane|on the path] in {place}",
        "tree [down|fell] on {veh} on {street}",
        "giant limb [cracked|snapped] and dangling over the road at {addr}",
        "[tree|trees] went down across {street} near {street2}, [police here|no one here yet]",
        "storm damaged tree about to come down next to {addr}",
        "tree trunk [lying|laying] across two lanes on {street} {time}",
        "branches came down through [my window|the skylight] at {addr}",
        "half of the tree outside {addr} [snapped off|broke off] [onto the sidewalk|into the street]",
        "tree in the park [collapsed|toppled over] at {place}, [bench crushed|path blocked]",
        "downed trees closing both lanes of {street}",
        "creaking sounds from the big tree by {addr} and now it's down",
        "a tree blew over onto the [bus stop|crosswalk] at {place}",
        "the tree on {street} dropped a [massive|huge] limb in the wind {time}",
        "top of the tree snapped and is lying in the [yard|street] at {addr}",
        "fallen tree on {street}, [branches|leaves] everywhere",
        "big old tree came down [last night|{time}] and [crushed|flattened] [a fence|two cars] on {street}",
        "limb down on the [sidewalk|walkway] near {place}, people stepping around it",
        "the tree next to my building toppled and blocks the entrance, {addr}",
        "storm snapped a tree [in half|at the trunk] at {street} and {street2}",
        "[trees|a row of trees] uprooted along {street}, [sidewalk lifted|roots exposed]",
    ),
}

EMERGENCY_CUES: dict[str, tuple[str, ...]] = {
    "traffic_accident": (
        "someone is trapped in the car", "the driver is bleeding", "a person is lying in the street not moving",
        "people are injured", "the car is smoking", "send an ambulance",
    ),
    "power_outage": (
        "wires are sparking", "a live wire is down on the sidewalk", "my mom is on oxygen and the machine is off",
        "people are trapped in the elevator", "there's a burning smell from the transformer",
    ),
    "fallen_tree": (
        "it took down live wires", "someone is trapped under it", "it's sparking where it hit the lines",
        "a man got hit and is hurt", "there are people stuck in the car it crushed",
    ),
    "water_sewer": (
        "water is pouring into the electrical panel", "the street is caving in", "i smell gas too",
        "someone fell in the open manhole",
    ),
    "heat_hot_water": (
        "i smell gas near the boiler", "the boiler is making smoke", "my grandmother is not responding, she is so cold",
        "the space heater is sparking",
    ),
    "street_condition": (
        "a cyclist fell in and is hurt badly", "the manhole cover exploded",
        "a car fell into the sinkhole with people in it",
    ),
}
HIGH_CUES: dict[str, tuple[str, ...]] = {
    "heat_hot_water": (
        "there's a newborn in the apartment", "my grandmother is 90", "it's been 4 days",
        "my son has asthma", "we have elderly tenants here",
    ),
    "street_condition": (
        "cars are swerving into oncoming traffic to avoid it", "it's blowing tires all day",
        "kids cross here to get to school",
    ),
    "sanitation": (
        "rats everywhere and kids play here", "it smells like something died",
        "it's blocking the sidewalk for wheelchairs",
    ),
    "illegal_parking": (
        "i need to take my kid to the hospital", "it's blocking the ambulance bay",
        "my dad uses a wheelchair and can't get out",
    ),
    "noise": (
        "i have a newborn who can't sleep", "i'm a nurse on night shift and can't sleep",
        "it's been every night for a month",
    ),
}
# fmt: on

_STREETS = (
    "Broadway", "Atlantic Ave", "Fulton St", "Grand Concourse", "Ocean Ave", "W 145th St", "3rd Ave",
    "Linden Blvd", "Myrtle Ave", "Queens Blvd", "Flatbush Ave", "E 14th St", "Amsterdam Ave", "Nostrand Ave",
    "Jamaica Ave", "Bedford Ave", "Northern Blvd", "Pelham Pkwy", "Hylan Blvd", "Kings Hwy", "Court St",
    "Roosevelt Ave", "Lexington Ave", "Fordham Rd", "Church Ave", "Steinway St", "Victory Blvd", "Utica Ave",
    "Delancey St", "Eastern Pkwy", "Bruckner Blvd", "Metropolitan Ave", "5th Ave", "Richmond Ave",
)
_APTS = ("apt 4B", "unit 12C", "#3F", "apartment 2R", "apt 1A", "6D", "the 5th floor", "my apartment")
_TIMES = (
    "at 2am", "since midnight", "every night at 3", "tonight", "right now", "this morning", "since 11pm",
    "around 4:30 am", "last night", "all weekend", "at 6 in the morning", "since yesterday",
)
_DURATIONS = (
    "3 days", "two weeks", "over a week", "5 hours", "48 hours", "a month", "three nights", "the whole weekend",
    "2 days", "ten days",
)
_VEHICLES = (
    "a white van", "a black SUV", "a yellow cab", "a pickup truck", "an Uber", "a delivery truck", "a box truck",
    "a gray Honda", "a motorcycle", "a Tesla", "a red sedan", "an Amazon van",
)
_PLACES = (
    "the fire station", "P.S. 41", "the bodega", "the laundromat", "the subway entrance", "the bus stop",
    "the park entrance", "the playground", "the library", "the church", "the hospital", "the car wash",
    "the gas station", "the parking garage", "the community garden", "the deli", "Key Food", "the McDonald's",
    "Prospect Park", "the high school",
)
_OPENERS = (
    "hi, ", "hello 311, ", "urgent: ", "complaint: ", "again!! ", "reporting: ", "yo ", "good morning, ",
    "311 please help: ", "this is the third time i'm reporting this. ", "not sure who to call but ", "FYI ",
    "hey, ", "can someone look into this? ", "@nyc311 ", "tenant here. ",
)
_CLOSERS = (
    " please send someone", " pls fix", " thank you", " thanks", " this has been going on for {dur}",
    " nobody is doing anything", " my landlord ignores us", " call me back", " #nyc #311", " ?!", " ugh",
    " fix it already", " the city never comes", " i already called twice", " right by {place}",
    " sent from my iphone", " (reported by a neighbor)",
)
_CONNECTORS = (". also ", " and ", "; on top of that ", ". plus ", " - and ", ". separately, ", "!! AND ")
_SLANG: dict[str, tuple[str, ...]] = {
    "please": ("pls", "plz"), "you": ("u",), "your": ("ur",), "because": ("bc", "cuz"), "people": ("ppl",),
    "tonight": ("tonite", "2nite"), "with": ("w/",), "about": ("abt",), "are": ("r",), "thanks": ("thx",),
    "building": ("bldg",), "apartment": ("apt",), "street": ("st",), "someone": ("some1",), "right now": ("rn",),
}
_SLANG_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _SLANG), key=len, reverse=True)) + r")\b")
_ALT_RE = re.compile(r"\[([^\[\]]*)\]")
_SLOT_RE = re.compile(r"\{(\w+)\}")


def _address(rng: random.Random) -> str:
    street, other = rng.sample(_STREETS, 2)
    forms = (
        f"{rng.randint(1, 2999)} {street}", f"{street} near {other}", f"the corner of {street} and {other}",
        f"{rng.randint(1, 999)} {street} {rng.choice(_APTS[:6])}",  # unit-style suffixes only
    )
    return rng.choice(forms)


_SLOTS: dict[str, Callable[[random.Random], str]] = {
    "addr": _address,
    "street": lambda rng: rng.choice(_STREETS),
    "street2": lambda rng: rng.choice(_STREETS),
    "apt": lambda rng: rng.choice(_APTS),
    "time": lambda rng: rng.choice(_TIMES),
    "dur": lambda rng: rng.choice(_DURATIONS),
    "veh": lambda rng: rng.choice(_VEHICLES),
    "place": lambda rng: rng.choice(_PLACES),
}


def fill(pattern: str, rng: random.Random) -> str:
    """Expands a template: each ``[a|b]`` picks one alternative, then each ``{slot}`` a value."""
    chosen = _ALT_RE.sub(lambda m: rng.choice(m.group(1).split("|")), pattern)
    return _SLOT_RE.sub(lambda m: _SLOTS[m.group(1)](rng), chosen)


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:  # swap two neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1:  # drop a letter
        return word[:i] + word[i + 1 :]
    return word[: i + 1] + word[i] + word[i + 1 :]  # double a letter


def stylise(text: str, rng: random.Random) -> str:
    """Applies the writing styles of real reports: slang, typos, case and punctuation."""
    if rng.random() < SLANG_RATE:
        text = _SLANG_RE.sub(lambda m: rng.choice(_SLANG[m.group(1).lower()]), text)
    if rng.random() < TYPO_RATE:
        words = text.split(" ")
        long_words = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
        for i in rng.sample(long_words, min(len(long_words), rng.randint(1, 2))):
            words[i] = _typo(words[i], rng)
        text = " ".join(words)
    case = rng.random()
    if case < LOWER_RATE:
        text = text.lower()
    elif case < LOWER_RATE + UPPER_RATE:
        text = text.upper()
    else:
        text = text[:1].upper() + text[1:]
    return text + rng.choice(("", "", ".", "!", "!!!", "??"))


def more_urgent(a: str, b: str) -> str:
    """The class that wins when a report mentions both (`URGENCY`)."""
    return a if URGENCY.index(a) <= URGENCY.index(b) else b


def priority_of(labels: Sequence[str], cue: str | None) -> str:
    """The priority rule: the highest of the mentioned classes' base priorities and the cue's level."""
    levels = [PRIORITIES.index(BASE_PRIORITY[lab]) for lab in labels]
    if cue is not None:
        levels.append(PRIORITIES.index(cue))
    return PRIORITIES[max(levels)]


def split_groups(groups: Mapping[str, Sequence[str]], seed: int) -> dict[tuple[str, str], str]:
    """Assigns each (label, template) group to a split: per label, a seeded shuffle of its sorted
    templates puts the first `TEST_SHARE` in `test`, the next `VALID_SHARE` in `valid`, the rest
    in `train` (each at least one when a label has three or more templates)."""
    out: dict[tuple[str, str], str] = {}
    for label in sorted(groups):
        names = sorted(set(groups[label]))
        random.Random(f"{seed}:{label}").shuffle(names)
        n_test = math.ceil(TEST_SHARE * len(names))
        n_valid = min(math.ceil(VALID_SHARE * len(names)), max(0, len(names) - n_test - 1))
        for i, name in enumerate(names):
            out[(label, name)] = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
    return out


def template_id(label: str, index: int) -> str:
    return f"{label}/{index:02d}"


def generate_corpus(seed: int = DEFAULT_SEED, sizes: Mapping[str, int] | None = None) -> dict[str, pd.DataFrame]:
    """Generates the train/valid/test reports (columns `COLUMNS`); deterministic for a seed.

    Args:
        seed: the generator seed (recorded in the manifest).
        sizes: reports per split; `SIZES["full"]` by default.

    Returns:
        One frame per split of `SPLITS`.
    """
    sizes = dict(sizes or SIZES["full"])
    assignment = split_groups({lab: [template_id(lab, i) for i in range(len(TEMPLATES[lab]))] for lab in LABELS},
                              seed)
    pools = {split: {lab: [i for i in range(len(TEMPLATES[lab])) if assignment[(lab, template_id(lab, i))] == split]
                     for lab in LABELS} for split in SPLITS}
    labels, weights = list(CLASS_SHARES), list(CLASS_SHARES.values())
    frames: dict[str, pd.DataFrame] = {}
    for split in SPLITS:
        rng = random.Random(f"{seed}:{split}")
        rows = []
        for _ in range(sizes[split]):
            label = rng.choices(labels, weights)[0]
            index = rng.choice(pools[split][label])
            body = fill(TEMPLATES[label][index], rng)
            cue = None
            if label in EMERGENCY_CUES and rng.random() < EMERGENCY_CUE_RATE:
                body, cue = f"{body}{rng.choice((', ', '. ', ' - '))}{rng.choice(EMERGENCY_CUES[label])}", "emergency"
            elif label in HIGH_CUES and rng.random() < HIGH_CUE_RATE:
                body, cue = f"{body}{rng.choice((', ', '. ', ' - '))}{rng.choice(HIGH_CUES[label])}", "high"
            second_label, second_template = "", ""
            mentioned = [label]
            if rng.random() < TWO_PROBLEM_RATE:
                others = [lab for lab in labels if lab != label]
                second_label = rng.choices(others, [CLASS_SHARES[lab] for lab in others])[0]
                second_index = rng.choice(pools[split][second_label])
                second_template = template_id(second_label, second_index)
                other_body = fill(TEMPLATES[second_label][second_index], rng)
                first, then = (body, other_body) if rng.random() < 0.5 else (other_body, body)
                body = f"{first}{rng.choice(_CONNECTORS)}{then}"
                mentioned.append(second_label)
            if rng.random() < OPENER_RATE:
                body = rng.choice(_OPENERS) + body
            if rng.random() < CLOSER_RATE:
                body = body.rstrip(".!?") + fill(rng.choice(_CLOSERS), rng)
            rows.append({
                "text": stylise(body, rng),
                "label": more_urgent(label, second_label) if second_label else label,
                "priority": priority_of(mentioned, cue),
                "template": template_id(label, index),
                "second_label": second_label,
                "second_template": second_template,
            })
        frames[split] = pd.DataFrame(rows, columns=COLUMNS)
    return frames


def corpus_sha256(frames: Mapping[str, pd.DataFrame]) -> str:
    """A checksum of the generated rows themselves (independent of the Parquet encoding)."""
    h = hashlib.sha256()
    for split in sorted(frames):
        for row in frames[split].to_dict("records"):
            h.update(json.dumps([split, row], sort_keys=True).encode())
    return h.hexdigest()


def read_user_corpus(path: Path, seed: int = DEFAULT_SEED) -> dict[str, pd.DataFrame]:
    """Reads and validates a user's labelled reports, then splits them by template.

    Raises:
        DataError: the file is unreadable or empty, lacks a column, has a blank text, an unknown
            label or priority (naming the first bad row), or too few templates to split.
    """
    frame = validate_frame(read_user_file(path), str(path), USER_COLUMNS)
    blank = frame["text"].str.strip().eq("")
    if blank.any():
        raise DataError(str(path), "blank text", column="text", row=int(blank.to_numpy().argmax()))
    for column, allowed in (("label", LABELS), ("priority", PRIORITIES)):
        bad = ~frame[column].isin(allowed)
        if bad.any():
            row = int(bad.to_numpy().argmax())
            raise DataError(str(path), f"{frame[column].iloc[row]!r} is not one of {list(allowed)}",
                            column=column, row=row)
    frame["text"] = frame["text"].astype(str)
    assignment = split_groups(frame.groupby("label")["template"].apply(list).to_dict(), seed)
    split_of = [assignment[(lab, tpl)] for lab, tpl in zip(frame["label"], frame["template"], strict=True)]
    frame["second_label"], frame["second_template"] = "", ""
    frame["split"] = split_of
    frames = {s: frame[frame["split"] == s].drop(columns="split").reset_index(drop=True) for s in SPLITS}
    empty = [s for s, f in frames.items() if f.empty]
    if empty:
        raise DataError(str(path), f"too few templates to split by template: no rows for {empty}; "
                        "give each label at least three templates", column="template")
    return frames


def prepare_events(data_dir: Path, *, source: Path | None = None, smoke: bool = False,
                   seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """Writes `data_dir/events/{train,valid,test}.parquet` and the manifest (atomically).

    Args:
        data_dir: the data root.
        source: a user's own corpus (see the module docstring) instead of the generated one.
        smoke: the tiny generated corpus (`SIZES["smoke"]`) for tests and `--smoke-test`.
        seed: the generator and split seed.

    Returns:
        The manifest.
    """
    if source is not None:
        frames = read_user_corpus(Path(source), seed)
        sources = [str(source)]
        extra: dict[str, Any] = {"split_seed": seed}
    else:
        sizes = SIZES["smoke" if smoke else "full"]
        frames = generate_corpus(seed, sizes)
        sources = [f"generated:cityserve-events-v{GENERATOR_VERSION}"]
        extra = {
            "generator": {
                "version": GENERATOR_VERSION,
                "seed": seed,
                "sizes": sizes,
                "generator_sha256": corpus_sha256(frames),
                "templates": {s: int(f["template"].nunique()) for s, f in frames.items()},
                "class_shares": CLASS_SHARES,
                "urgency": list(URGENCY),
                "two_problem_rate": TWO_PROBLEM_RATE,
            },
        }
    extra["subsets"] = {"valid": "holdout_templates", "test": "template_disjoint"}
    return write_splits(data_dir, DOMAIN, frames, sources=sources, extra=extra)
