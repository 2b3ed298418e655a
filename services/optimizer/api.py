"""Optimizer endpoints: performance data, analysis, rules and actions, re-ranking."""
from __future__ import annotations

import requests
from flask import current_app
from flask.views import MethodView

from services.common.app import Blueprint, current_settings
from services.common.db import get_db
from services.optimizer import analysis, performance, rankings, rules
from services.optimizer.schemas import (ActionListSchema, ActionsQuerySchema, AnalysisSchema,
                                        EvaluationSchema, OptimizeSchema, PerformanceBatchOutSchema,
                                        PerformanceBatchSchema, PerformanceLogOutSchema,
                                        PerformanceLogSchema, RankingsSchema, RefreshSchema,
                                        RuleListSchema, RuleOutSchema, RulePatchSchema, RuleSchema,
                                        RulesQuerySchema, SummaryQuerySchema, SummarySchema,
                                        WindowQuerySchema)

blp = Blueprint("optimizer", __name__, description="Performance analysis, optimization rules, re-ranking")


def _http() -> requests.Session:
    """The session the actions call the orchestrator and registry with (set up in create_app)."""
    return current_app.extensions["optimizer_http"]


@blp.route("/performance")
class Performance(MethodView):
    @blp.arguments(PerformanceLogSchema)
    @blp.response(201, PerformanceLogOutSchema)
    def post(self, row):
        """Log one attempt (for n8n flows that call models themselves)."""
        with get_db().connection() as conn:
            return performance.log_performance(conn, row)


@blp.route("/performance/batch")
class PerformanceBatch(MethodView):
    @blp.arguments(PerformanceBatchSchema)
    @blp.response(201, PerformanceBatchOutSchema)
    def post(self, body):
        """Log up to 1000 attempts, all or none."""
        with get_db().connection() as conn:
            items = performance.log_performance_batch(conn, body["items"])
        return {"count": len(items), "items": items}


@blp.route("/performance/summary")
class PerformanceSummary(MethodView):
    @blp.arguments(SummaryQuerySchema, location="query")
    @blp.response(200, SummarySchema)
    def get(self, args):
        """Per-model figures of the last 24 hours, as of the last refresh."""
        with get_db().connection() as conn:
            return {"items": performance.summary(conn, **args)}


@blp.route("/performance/refresh")
class PerformanceRefresh(MethodView):
    @blp.response(200, RefreshSchema)
    def post(self):
        """Refresh the summary concurrently; a refresh already running is not started twice."""
        settings = current_settings()
        return performance.refresh_summary(settings.database_url, settings.db_statement_timeout_ms)


@blp.route("/analysis")
class Analysis(MethodView):
    @blp.arguments(WindowQuerySchema, location="query")
    @blp.response(200, AnalysisSchema)
    def get(self, args):
        """Recommendations with their evidence over the window."""
        with get_db().connection() as conn:
            found = analysis.analyze(conn, args["window_seconds"])
        return {"window_seconds": args["window_seconds"], "recommendations": found}


@blp.route("/rules")
class Rules(MethodView):
    @blp.arguments(RulesQuerySchema, location="query")
    @blp.response(200, RuleListSchema)
    def get(self, args):
        """Rules with their conditions, in evaluation order (priority first)."""
        with get_db().connection() as conn:
            return {"items": rules.list_rules(conn, **args)}

    @blp.arguments(RuleSchema)
    @blp.response(201, RuleOutSchema)
    def post(self, rule):
        """Create a rule; its conditions are validated against the fixed metric list."""
        with get_db().connection() as conn:
            return rules.create_rule(conn, rule)


@blp.route("/rules/<uuid:rule_id>")
class Rule(MethodView):
    @blp.response(200, RuleOutSchema)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, rule_id):
        """One rule."""
        with get_db().connection() as conn:
            return rules.get_rule(conn, str(rule_id))

    @blp.arguments(RulePatchSchema)
    @blp.response(200, RuleOutSchema)
    @blp.alt_response(404, response="NOT_FOUND")
    def patch(self, patch, rule_id):
        """Change some fields of a rule; `conditions`, when given, replaces all of them."""
        with get_db().connection() as conn:
            return rules.update_rule(conn, str(rule_id), patch)

    @blp.response(204)
    @blp.alt_response(404, response="NOT_FOUND")
    def delete(self, rule_id):
        """Delete a rule (its audit rows stay)."""
        with get_db().connection() as conn:
            rules.delete_rule(conn, str(rule_id))


@blp.route("/rules/<uuid:rule_id>/evaluate")
class RuleEvaluation(MethodView):
    @blp.response(200, EvaluationSchema)
    @blp.alt_response(404, response="NOT_FOUND")
    def post(self, rule_id):
        """Dry run: the measured values, the verdict and the action that would run."""
        with get_db().connection() as conn:
            return rules.dry_run(conn, _http(), current_settings(), str(rule_id))


@blp.route("/optimize")
class Optimize(MethodView):
    @blp.response(200, OptimizeSchema)
    def post(self):
        """Evaluate the active rules in priority order and run the actions of those that trigger."""
        return {"results": rules.optimize(get_db(), _http(), current_settings())}


@blp.route("/actions")
class Actions(MethodView):
    @blp.arguments(ActionsQuerySchema, location="query")
    @blp.response(200, ActionListSchema)
    def get(self, args):
        """The audit trail of rule actions, newest first."""
        with get_db().connection() as conn:
            return {"items": rules.list_actions(conn, **args)}


@blp.route("/rankings/update")
class RankingsUpdate(MethodView):
    @blp.arguments(WindowQuerySchema, location="query")
    @blp.response(200, RankingsSchema)
    def post(self, args):
        """Recompute every model's ranking inputs from the window and write them to the registry."""
        with get_db().connection() as conn:
            return rankings.update_rankings(conn, args["window_seconds"])
