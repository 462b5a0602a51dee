"""A small grammar for the math a person types, parsed without eval into plain nested lists.

The tree is built here, in the service process, and is only data (lists of strings), so it can be
sent to the sympy worker as JSON; sympy objects are made there (solvers.build), where a runaway
computation can be killed. Anything outside the grammar (an unknown word, a stray symbol) is a
ParseError, which means "not math": the provider then adds nothing.

Node forms: ["n", "12.5"], ["v", "x"], ["c", "pi"], [op, a, b] for + - * / ^ mod,
["neg", a], ["!", a], ["pct", a], ["f", name, arg...].
"""

from __future__ import annotations

import re

# Size bounds: what a person asks fits well inside them; anything larger is refused before any work.
MAX_CHARS = 200
MAX_TOKENS = 60
MAX_DIGITS = 60  # per number literal (factoring a 60-digit number may still run out of time: see pool.py)
MAX_DEPTH = 8  # parentheses and nested function calls

VARIABLES = {"x", "y", "z", "t"}
CONSTANTS = {"pi", "e"}
# Function name in the text -> (canonical name, number of arguments).
FUNCTIONS = {
    "sqrt": ("sqrt", 1),
    "cbrt": ("cbrt", 1),
    "sin": ("sin", 1),
    "sen": ("sin", 1),
    "cos": ("cos", 1),
    "tan": ("tan", 1),
    "exp": ("exp", 1),
    "ln": ("log", 1),
    "log": ("log", 1),
    "abs": ("abs", 1),
    "binomial": ("binomial", 2),
    "perm": ("perm", 2),
}

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|([a-z]+)|(\*\*|[-+*/^()!%,]))")


class ParseError(ValueError):
    pass


def tokenize(text: str) -> list[tuple[str, str]]:
    if len(text) > MAX_CHARS:
        raise ParseError("too long")
    tokens, position, text = [], 0, text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match:
            raise ParseError(f"unexpected {text[position]!r}")
        number, word, symbol = match.groups()
        position = match.end()
        if number:
            if len(number.replace(".", "")) > MAX_DIGITS:
                raise ParseError("number too long")
            tokens.append(("num", number))
        elif word:
            tokens.extend(_word_tokens(word))
        else:
            tokens.append(("op", "^" if symbol == "**" else symbol))
        if len(tokens) > MAX_TOKENS:
            raise ParseError("too many terms")
    return tokens


def _word_tokens(word: str) -> list[tuple[str, str]]:
    if word in FUNCTIONS:
        return [("fn", word)]
    if word == "mod":
        return [("op", "mod")]
    if word in CONSTANTS:
        return [("const", word)]
    if len(word) <= 3 and all(ch in VARIABLES for ch in word):  # "xy" is x times y
        return [("var", ch) for ch in word]
    raise ParseError(f"not math: {word!r}")


class _Parser:
    def __init__(self, tokens):
        self.tokens, self.i, self.depth = tokens, 0, 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else ("end", "")

    def take(self, kind=None, value=None):
        token = self.peek()
        if (kind and token[0] != kind) or (value and token[1] != value):
            raise ParseError(f"expected {value or kind}, found {token[1] or 'the end'}")
        self.i += 1
        return token

    def expression(self):
        node = self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take()[1]
            node = [op, node, self.term()]
        return node

    def term(self):
        node = self.unary()
        while True:
            kind, value = self.peek()
            if kind == "op" and value in ("*", "/", "mod"):
                self.take()
                node = [value, node, self.unary()]
            elif kind == "op" and value == "%" and self._starts_atom(1):
                self.take()
                node = ["mod", node, self.unary()]
            elif kind in ("var", "const", "fn") or (kind, value) == ("op", "("):
                node = ["*", node, self.unary()]  # implicit: 2x, 3(x + 1), x sin(x)
            else:
                return node

    def _starts_atom(self, ahead):
        kind, value = self.tokens[self.i + ahead] if self.i + ahead < len(self.tokens) else ("end", "")
        return kind in ("num", "var", "const", "fn") or value == "("

    def unary(self):
        if self.peek() == ("op", "-"):
            self.take()
            return ["neg", self.unary()]
        if self.peek() == ("op", "+"):
            self.take()
            return self.unary()
        return self.power()

    def power(self):
        node = self.postfix()
        if self.peek() == ("op", "^"):
            self.take()
            node = ["^", node, self.unary()]  # right-associative; -2^2 is -(2^2)
        return node

    def postfix(self):
        node = self.atom()
        while True:
            if self.peek() == ("op", "!"):
                self.take()
                node = ["!", node]
            elif self.peek() == ("op", "%") and not self._starts_atom(1):
                self.take()
                node = ["pct", node]
            else:
                return node

    def nested(self, parse):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError("nested too deeply")
        node = parse()
        self.depth -= 1
        return node

    def atom(self):
        kind, value = self.take()
        if kind == "num":
            return ["n", value]
        if kind == "var":
            return ["v", value]
        if kind == "const":
            return ["c", value]
        if (kind, value) == ("op", "("):
            node = self.nested(self.expression)
            self.take("op", ")")
            return node
        if kind == "fn":
            name, arity = FUNCTIONS[value]
            if self.peek() != ("op", "("):  # "sqrt 16", "sin x": the function takes the next power
                if arity != 1:
                    raise ParseError(f"{value} needs parentheses")
                return ["f", name, self.nested(self.power)]
            self.take()
            args = [self.nested(self.expression)]
            while self.peek() == ("op", ","):
                self.take()
                args.append(self.nested(self.expression))
            self.take("op", ")")
            if len(args) != arity:
                raise ParseError(f"{value} takes {arity} arguments")
            return ["f", name, *args]
        raise ParseError(f"unexpected {value or 'end'}")


def parse(text: str) -> list:
    parser = _Parser(tokenize(text))
    if not parser.tokens:
        raise ParseError("empty")
    node = parser.expression()
    if parser.i != len(parser.tokens):
        raise ParseError(f"unexpected {parser.peek()[1]!r}")
    return node


def variables(node) -> set[str]:
    if node[0] == "v":
        return {node[1]}
    if node[0] in ("n", "c"):
        return set()
    return set().union(*(variables(child) for child in node[1:] if isinstance(child, list)))


def has_operation(node) -> bool:
    return node[0] not in ("n", "v", "c")


_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "mod": 2, "neg": 3, "^": 4, "!": 5, "pct": 5}


def render(node, parent: int = 0) -> str:
    """The tree as a person would write it: '345 * 27', '(3 + 4) * 2', 'sqrt(1764)', '2x + 3'."""
    kind = node[0]
    if kind in ("n", "v", "c"):
        return node[1]
    if kind == "f":
        return f"{node[1]}({', '.join(render(arg) for arg in node[2:])})"
    own = _PRECEDENCE[kind]
    if kind == "neg":
        text = "-" + render(node[1], own)
    elif kind in ("!", "pct"):
        text = render(node[1], own) + ("!" if kind == "!" else "%")
    elif kind == "*" and node[1][0] == "n" and node[2][0] in ("v", "f", "c"):
        text = render(node[1], own) + render(node[2], own)  # 2x, 3sin(x)
    elif kind == "/" and node[1][0] == node[2][0] == "n":
        text = f"{node[1][1]}/{node[2][1]}"  # a fraction: 1/3
    elif kind == "^":
        text = f"{render(node[1], own + 1)}^{render(node[2], own)}"
    else:
        text = f"{render(node[1], own)} {kind} {render(node[2], own + 1)}"
    return f"({text})" if own < parent or (own == parent and kind == "^") else text
