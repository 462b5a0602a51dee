"""The routes and models of shared/ARCHITECTURE.md, which config/routes.yaml ships."""

ARCHITECTURE_ROUTES = {
    "programming": "gpt-oss-20b",
    "creative_writing": "mixtral",
    "quick_facts": "phi",
    "analysis": "gpt-oss-20b",
    "conversation": "phi",
    "math": "gpt-oss-20b",
    "translation": "mixtral",
}
ARCHITECTURE_DEFAULT_MODEL = "gpt-oss-20b"
