"""Azure Functions entry point. The triggers live in pipeline/entrypoints/functions.py; the work in pipeline/runner.py."""

import azure.functions as func

from pipeline.entrypoints.functions import bp

app = func.FunctionApp()
app.register_functions(bp)
