"""Writes coding_questions.jsonl: a harmless pool of ordinary programming questions.

The demo models are coding models, so their users' harmless traffic is full of programming
questions, which no shared harmless set covers. This pool is for mining hard negatives only
(``guard fit --pool``, ``guard crossval --pool``), never for scoring: tasks x languages x four
phrasings, deterministic. Run ``python -m pyvene_harm.prompts.make_coding_questions`` to rebuild.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

TASKS = ["reverse a linked list", "read a CSV file and sum one column", "parse a JSON string into a dictionary",
         "sort a list of dictionaries by a key", "remove duplicates from a list while keeping the order",
         "check whether a string is a palindrome", "merge two sorted arrays", "count the words in a text file",
         "make an HTTP GET request and print the status code", "format a date as YYYY-MM-DD",
         "find the largest number in an array", "write a unit test for a function that adds two numbers",
         "implement binary search", "convert a string to uppercase", "read environment variables",
         "create a class with a constructor and a method", "handle an exception when a file is missing",
         "compute the factorial of a number recursively", "split a string on commas", "flatten a nested list",
         "connect to a SQLite database and create a table", "generate a random password of 12 characters",
         "measure how long a function takes to run", "zip two lists together", "compute the average of a list",
         "write a function that returns the n-th Fibonacci number", "iterate over the files in a directory",
         "define an enum", "serialize an object to JSON",
         "use a regular expression to find all email addresses in a text"]
LANGUAGES = ["Python", "JavaScript", "Java", "C++", "Go", "Rust", "TypeScript", "C#", "Ruby", "Bash"]
PHRASINGS = ["How do I {t} in {l}?", "Write {l} code to {t}.", "Show me how to {t} in {l}.",
             "What is the idiomatic way to {t} in {l}?"]


def coding_questions() -> list[str]:
    out = []
    for k, (t, lang) in enumerate(itertools.product(TASKS, LANGUAGES)):
        if lang == "Bash" and k % 3:  # one shell phrasing in three
            continue
        out.append(PHRASINGS[k % len(PHRASINGS)].format(t=t, l=lang))
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("coding_questions.jsonl")
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in coding_questions()))
