"""ODinW (Object Detection in the Wild) tasks as used by GLIP.

Facts carried over from the official configs (microsoft/GLIP `configs/odinw_35/*.yaml`, `_all.json`):
category lists (`DATASETS.OVERRIDE_CATEGORY`, ids 1..K), prompt descriptions (`DATASETS.CAPTION_PROMPT`,
prefix/name/suffix), data paths (`DATASETS.REGISTER`) and the split each config evaluates on
(`DATASETS.TEST`). ODinW-13 is the subset of the GLIP paper's Table 9. Data: one zip per dataset in the Hub
model repo `GLIPModel/GLIP`, path `odinw_35/<Name>.zip`, unpacked under `<data root>/odinw/`.

The odinw_13 configs carry no CAPTION_PROMPT; the descriptions here are the odinw_35 ones. Prompts use
them by default where present; `Task.prompt(use_descriptions=False)` gives the plain odinw_13 prompt.
"""
from __future__ import annotations

from tasks.category import Category
from tasks.task import SplitSpec, Task, roboflow_splits

HUB_REPO = "GLIPModel/GLIP"
HUB_FOLDER = "odinw_35"
ODINW_DIR = "odinw"  # under the data root
OFFICIAL_ANN = "annotations_without_background.json"
ROBOFLOW_ANN = "_annotations.coco.json"

# name: (zip, folder inside odinw/, categories, evaluated split, layout, in ODinW-13)
# categories: names, or (prefix, name, suffix[, phrase]) where the config has a CAPTION_PROMPT entry.
_TABLE: dict[str, tuple] = {
    "aerial-maritime-drone": ("AerialMaritimeDrone", "AerialMaritimeDrone/large",
                              ["boat", "car", "dock", "jetski", "lift"], "valid", "roboflow", True),
    "aerial-maritime-drone-tiled": ("AerialMaritimeDrone", "AerialMaritimeDrone/tiled",
                                    ["boat", "car", "dock", "jetski", "lift"], "valid", "roboflow", False),
    "american-sign-language-letters": (
        "AmericanSignLanguageLetters", "AmericanSignLanguageLetters/American Sign Language Letters.v1-v1.coco",
        list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), "valid", "roboflow", False),
    "aquarium": ("Aquarium", "Aquarium/Aquarium Combined.v2-raw-1024.coco",
                 [(" ", "fish", ""), "jellyfish", ("", "penguin", " , which is black and white"),
                  ("", "puffin", " with orange beaks "), "shark", "starfish",
                  ("", "stingray", " which is flat and round")], "valid", "roboflow", True),
    "bccd": ("BCCD", "BCCD/BCCD.v3-raw.coco", ["Platelets", "RBC", "WBC"], "valid", "roboflow", False),
    # id 1 is named "  " (two spaces) in the official config, a Roboflow artefact: prompted as "chess piece".
    "chess-pieces": ("ChessPieces", "ChessPieces/Chess Pieces.v23-raw.coco",
                     [("", "  ", "", "chess piece"), "black bishop", "black king", "black knight", "black pawn",
                      "black queen", "black rook", "white bishop", "white king", "white knight", "white pawn",
                      "white queen", "white rook"], "valid", "roboflow", False),
    "cottontail-rabbits": ("CottontailRabbits", "CottontailRabbits", ["rabbit"], "valid", "roboflow", True),
    "drone-control": ("DroneControl", "DroneControl/Drone Control.v3-raw.coco",
                      ["follow", "follow_hand", "land", "land_hand", "null", "object", "takeoff", "takeoff-hand"],
                      "minival", "roboflow-minival", False),
    "egohands": ("EgoHands", "EgoHands/generic", [(" ", "hand", " of a person")], "minival", "roboflow-minival",
                 True),
    "egohands-specific": ("EgoHands", "EgoHands/specific", ["myleft", "myright", "yourleft", "yourright"],
                          "minival", "roboflow-minival", False),
    "hard-hat-workers": ("HardHatWorkers", "HardHatWorkers/raw", ["head", "helmet", "person"], "valid",
                         "roboflow", False),
    "mask-wearing": ("MaskWearing", "MaskWearing/raw", ["mask", "no-mask"], "valid", "roboflow", False),
    "mountain-dew-commercial": ("MountainDewCommercial", "MountainDewCommercial", ["bottle"], "valid", "roboflow",
                                False),
    "north-america-mushrooms": (
        "NorthAmericaMushrooms", "NorthAmericaMushrooms/North American Mushrooms.v1-416x416.coco",
        ["flat mushroom", "yellow mushroom"], "valid", "roboflow", True),
    "oxford-pets-by-breed": (
        "OxfordPets", "OxfordPets/by-breed",
        ["cat-Abyssinian", "cat-Bengal", "cat-Birman", "cat-Bombay", "cat-British_Shorthair", "cat-Egyptian_Mau",
         "cat-Maine_Coon", "cat-Persian", "cat-Ragdoll", "cat-Russian_Blue", "cat-Siamese", "cat-Sphynx",
         "dog-american_bulldog", "dog-american_pit_bull_terrier", "dog-basset_hound", "dog-beagle", "dog-boxer",
         "dog-chihuahua", "dog-english_cocker_spaniel", "dog-english_setter", "dog-german_shorthaired",
         "dog-great_pyrenees", "dog-havanese", "dog-japanese_chin", "dog-keeshond", "dog-leonberger",
         "dog-miniature_pinscher", "dog-newfoundland", "dog-pomeranian", "dog-pug", "dog-saint_bernard",
         "dog-samoyed", "dog-scottish_terrier", "dog-shiba_inu", "dog-staffordshire_bull_terrier",
         "dog-wheaten_terrier", "dog-yorkshire_terrier"], "minival", "roboflow-minival", False),
    "oxford-pets-by-species": ("OxfordPets", "OxfordPets/by-species", ["cat", "dog"], "minival", "roboflow-minival",
                               False),
    "packages": ("Packages", "Packages/Raw", [("there is a ", "package", " on the porch")], "valid", "roboflow",
                 True),
    # The official PascalVOC config registers its test split on the valid/ folder.
    "pascal-voc": ("PascalVOC", "PascalVOC",
                   ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
                    "tvmonitor"], "valid", "roboflow-nottest", True),
    "pistols": ("pistols", "pistols/export", ["pistol"], "valid", "export", True),
    "pklot": ("PKLot", "PKLot/640", ["space-empty", "space-occupied"], "minival", "roboflow-minival", False),
    # GLIP's pothole prompt names "holes": only that word is positive.
    "pothole": ("pothole", "pothole", [("there are some ", "pothole", " on the road", "holes")], "valid",
                "roboflow", True),
    "raccoon": ("Raccoon", "Raccoon/Raccoon.v2-raw.coco", ["raccoon"], "valid", "roboflow", True),
    "shellfish-open-images": ("ShellfishOpenImages", "ShellfishOpenImages/raw", ["Crab", "Lobster", "Shrimp"],
                              "valid", "roboflow", True),
    "thermal-cheetah": ("ThermalCheetah", "ThermalCheetah", ["cheetah", "human"], "valid", "roboflow", False),
    "uno-cards": ("UnoCards", "UnoCards/raw", [str(i) for i in range(15)], "minival", "roboflow-minival", False),
    "vehicles-open-images": ("VehiclesOpenImages", "VehiclesOpenImages/416x416",
                             ["Ambulance", "Bus", "Car", "Motorcycle", "Truck"], "minival", "roboflow-minival", True),
    "wildfire-smoke": ("WildfireSmoke", "WildfireSmoke", ["smoke"], "valid", "roboflow", False),
    "boggle-boards": ("boggleBoards", "boggleBoards/416x416AutoOrient/export",
                      ["Q", "a", "an", "b", "c", "d", "e", "er", "f", "g", "h", "he", "i", "in", "j", "k", "l", "m",
                       "n", "o", "o ", "p", "q", "qu", "r", "s", "t", "t\\", "th", "u", "v", "w", "wild", "x", "y",
                       "z"], "valid", "export", False),
    "brackish-underwater": ("brackishUnderwater", "brackishUnderwater/960x540",
                            ["crab", "fish", "jellyfish", "shrimp", "small_fish", "starfish"], "minival",
                            "roboflow-minival", False),
    "dice": ("dice", "dice/mediumColor/export", ["1", "2", "3", "4", "5", "6"], "valid", "export", False),
    "open-poetry-vision": (
        "openPoetryVision", "openPoetryVision/512x512",
        ["American Typewriter", "Andale Mono", "Apple Chancery", "Arial", "Avenir", "Baskerville", "Big Caslon",
         "Bradley Hand", "Brush Script MT", "Chalkboard", "Comic Sans MS", "Copperplate", "Courier", "Didot",
         "Futura", "Geneva", "Georgia", "Gill Sans", "Helvetica", "Herculanum", "Impact", "Kefa", "Lucida Grande",
         "Luminari", "Marker Felt", "Menlo", "Monaco", "Noteworthy", "Optima", "PT Sans", "PT Serif", "Palatino",
         "Papyrus", "Phosphate", "Rockwell", "SF Pro", "SignPainter", "Skia", "Snell Roundhand", "Tahoma",
         "Times New Roman", "Trebuchet MS", "Verdana"], "minival", "roboflow-minival", False),
    "plantdoc": ("plantdoc", "plantdoc/416x416",
                 ["Apple Scab Leaf", "Apple leaf", "Apple rust leaf", "Bell_pepper leaf", "Bell_pepper leaf spot",
                  "Blueberry leaf", "Cherry leaf", "Corn Gray leaf spot", "Corn leaf blight", "Corn rust leaf",
                  "Peach leaf", "Potato leaf", "Potato leaf early blight", "Potato leaf late blight",
                  "Raspberry leaf", "Soyabean leaf", "Soybean leaf", "Squash Powdery mildew leaf",
                  "Strawberry leaf", "Tomato Early blight leaf", "Tomato Septoria leaf spot", "Tomato leaf",
                  "Tomato leaf bacterial spot", "Tomato leaf late blight", "Tomato leaf mosaic virus",
                  "Tomato leaf yellow virus", "Tomato mold leaf", "Tomato two spotted spider mites leaf",
                  "grape leaf", "grape leaf black rot"], "valid", "roboflow", False),
    "selfdriving-car": ("selfdrivingCar", "selfdrivingCar/fixedLarge/export",
                        ["biker", "car", "pedestrian", "trafficLight", "trafficLight-Green", "trafficLight-GreenLeft",
                         "trafficLight-Red", "trafficLight-RedLeft", "trafficLight-Yellow",
                         "trafficLight-YellowLeft", "truck"], "valid", "export", False),
    "thermal-dogs-and-people": ("thermalDogsAndPeople", "thermalDogsAndPeople", ["dog", "person"], "valid",
                                "roboflow", True),
    "website-screenshots": ("websiteScreenshots", "websiteScreenshots",
                            ["button", "field", "heading", "iframe", "image", "label", "link", "text"], "minival",
                            "roboflow-minival", False),
}

ODINW13 = tuple(name for name, row in _TABLE.items() if row[5])
ODINW35 = tuple(_TABLE)


def _category(entry, index: int) -> Category:
    if isinstance(entry, str):
        return Category(entry, id=index + 1)
    prefix, name, suffix, *phrase = entry
    return Category(name, prefix=prefix, suffix=suffix, phrase=phrase[0] if phrase else None, id=index + 1)


def _splits(layout: str) -> dict[str, SplitSpec]:
    """Split paths relative to the task folder."""
    anns = (OFFICIAL_ANN, ROBOFLOW_ANN)
    if layout == "export":  # one folder, one file per split: <split>_annotations_without_background.json
        return {key: SplitSpec((f"{split}_{OFFICIAL_ANN}",), ".")
                for key, split in (("train", "train"), ("valid", "val"), ("test", "test"))}
    names = ["train", "valid", "test"] + (["mini_val"] if layout == "roboflow-minival" else [])
    splits = roboflow_splits("", names, anns)
    if layout == "roboflow-nottest":
        splits["test"] = splits["valid"]
    return splits


def odinw_tasks() -> dict[str, Task]:
    tasks = {}
    for name, (zip_name, folder, cats, eval_split, layout, in13) in _TABLE.items():
        tasks[name] = Task(
            name=name,
            categories=tuple(_category(c, i) for i, c in enumerate(cats)),
            splits=_splits(layout),
            subdir=f"{ODINW_DIR}/{folder}",
            eval_split=eval_split,
            suite="odinw13" if in13 else "odinw35",
            description=f"ODinW {zip_name}" + (f" ({folder.split('/', 1)[1]})" if "/" in folder else ""),
            source=f"Hub {HUB_REPO}: {HUB_FOLDER}/{zip_name}.zip",
            fetch_file=f"{HUB_FOLDER}/{zip_name}.zip",
        )
    return tasks
