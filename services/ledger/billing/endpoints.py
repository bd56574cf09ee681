from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from services.kit.authority import authorize
from services.kit.db import Session
from services.kit.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    ServiceUnavailable,
    Unprocessable,
    UpstreamError,
)
from services.kit.openapi import STANDARD, error_responses
from services.kit.principal import CurrentPrincipal, Principal
from services.kit.schemas import UserId
from services.ledger.billing.schemas import (
    Alert,
    AlertPage,
    Catalog,
    CatalogItem,
    CatalogItemPut,
    ItemId,
    Order,
    OrderCreate,
    PaymentPage,
    ReconcileIn,
    ReconcileResult,
    Revenue,
    Subscription,
    SubscriptionCreate,
    VerifyIn,
    VerifyResult,
    WebhookAck,
    item_out,
    payment_out,
)
from services.ledger.billing.service import Billing
from services.ledger.billing.tasks import reconcile
from services.ledger.config import get_settings
from services.ledger.repository import LedgerRepository

router = APIRouter(prefix="/v1/billing", tags=["billing"])


NOT_CONFIGURED = ServiceUnavailable(
    "Payments are not configured (KU_RAZORPAY_KEY_ID / KU_RAZORPAY_KEY_SECRET)",
    code="billing_not_configured",
)
ERRORS = error_responses(
    {
        400: (
            "Bad signature, unknown order, or a payment that is not the order's",
            [
                BadRequest("Payment signature does not match", code="invalid_signature"),
                BadRequest("Unknown order", code="unknown_order"),
                BadRequest("The payment is not for this order", code="payment_order_mismatch"),
            ],
        ),
        401: "Missing or invalid credentials",
        403: (
            "Missing scope, or another user's order",
            [
                Forbidden("Missing scope: ledger:write", code="missing_scope"),
                Forbidden("This app may act only for users linked to it", code="user_not_linked"),
            ],
        ),
        404: (
            "Unknown item or user",
            [
                NotFound("No such item in the catalog", code="unknown_item", item="credits-500"),
                STANDARD[404],
            ],
        ),
        422: (
            "Invalid input",
            [
                STANDARD[422],
                Unprocessable("Only plans can be subscribed to", code="not_a_plan"),
            ],
        ),
        502: (
            "Razorpay refused or could not be reached",
            [
                UpstreamError("Razorpay refused to create an order", code="razorpay_rejected"),
                UpstreamError(
                    "Razorpay is unavailable (create an order)", code="razorpay_unavailable"
                ),
            ],
        ),
        503: ("Payments are not configured", NOT_CONFIGURED),
    }
)


async def get_billing(request: Request, session: Session) -> Billing:
    return Billing(session, request.app.state.ledger, get_settings())


BillingDep = Annotated[Billing, Depends(get_billing)]


async def _may(operation: str, principal: Principal, billing: Billing, user_id: str) -> None:
    """The authority table (services/kit/authority.py), then whether this user is the
    caller's (a partner's linked user), looked up in this transaction."""
    permit = authorize(principal, operation)
    await LedgerRepository(billing.repo.session).check_user(permit, user_id)


@router.get(
    "/catalog",
    summary="What can be bought: top-ups and subscriptions",
    response_model=Catalog,
    responses={
        **ERRORS,
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "items": [
                            {
                                "id": "lite_monthly",
                                "kind": "plan",
                                "name": "Lite (monthly)",
                                "credits": 500,
                                "price": 2000,
                                "currency": "USD",
                                "period": "month",
                                "active": True,
                                "updated_at": "2026-11-26T10:33:52Z",
                            },
                            {
                                "id": "pro_monthly",
                                "kind": "plan",
                                "name": "Pro (monthly)",
                                "credits": 1500,
                                "price": 5000,
                                "currency": "USD",
                                "period": "month",
                                "active": True,
                                "updated_at": "2026-11-26T10:33:52Z",
                            },
                        ]
                    }
                }
            }
        },
    },
)
async def get_catalog(
    principal: CurrentPrincipal,
    billing: BillingDep,
    include_inactive: bool = Query(False, description="Admins only: also retired items"),
) -> Catalog:
    """Top-up packs and plans for sale, with prices in minor units and credits in Ku."""
    if include_inactive:
        authorize(principal, "billing.admin")
    rows = await billing.repo.catalog(include_inactive=include_inactive)
    return Catalog(items=[item_out(r) for r in rows])


@router.put(
    "/catalog/{item_id}",
    summary="Create or change a catalog item (admin)",
    response_model=CatalogItem,
    responses=ERRORS,
)
async def put_catalog_item(
    item_id: ItemId, body: CatalogItemPut, principal: CurrentPrincipal, billing: BillingDep
) -> CatalogItem:
    """Create or replace a catalog item (admin). Orders already placed keep their price."""
    authorize(principal, "billing.admin")
    values = {
        "kind": body.kind,
        "name": body.name,
        "credits_milli": body.credits,
        "price_minor": body.price,
        "currency": body.currency,
        "period": body.period,
        "active": body.active,
    }
    return item_out(await billing.put_item(item_id, values))


@router.post(
    "/orders",
    summary="Start buying a top-up (a Razorpay order)",
    status_code=201,
    response_model=Order,
    responses={
        **ERRORS,
        201: {
            "content": {
                "application/json": {
                    "example": {
                        "order_id": "kuord_4296f649961445439eb369f740402bec",
                        "razorpay_order_id": "order_dcdroPFOzfnu08",
                        "user_id": "101902121794505144784",
                        "item": "topup_25",
                        "credits": 25,
                        "amount": 300,
                        "currency": "USD",
                        "key_id": "rzp_test_10f228c57614",
                        "status": "created",
                        "created_at": "2026-11-26T10:45:13Z",
                    }
                }
            }
        },
    },
)
async def create_order(
    body: OrderCreate, principal: CurrentPrincipal, billing: BillingDep
) -> Order:
    """Open a Razorpay order for a catalog item; pass the result to Razorpay checkout."""
    await _may("billing.buy", principal, billing, body.user_id)
    order = await billing.create_order(body.user_id, body.item)
    return Order(
        order_id=order["id"],
        razorpay_order_id=order["razorpay_order_id"],
        user_id=order["user_id"],
        item=order["item_id"],
        credits=order["credits_milli"],
        amount=order["amount_minor"],
        currency=order["currency"],
        key_id=order["key_id"],
        status=order["status"],
        created_at=order["created_at"],
    )


@router.post(
    "/verify",
    summary="Confirm a checkout payment",
    response_model=VerifyResult,
    responses={
        **ERRORS,
        202: {"description": "Authorized, not captured yet: the webhook will grant"},
        **error_responses(
            {
                409: (
                    "The payment does not match its order (amount, currency): nothing granted",
                    Conflict(
                        "The payment does not match its order; nothing was granted",
                        code="payment_rejected",
                        payment_id="pay_Nk3v9x0qa81LmZ",
                    ),
                )
            }
        ),
    },
)
async def verify_payment(
    body: VerifyIn, principal: CurrentPrincipal, billing: BillingDep, response: Response
) -> Any:
    """Checkout's success handler: check the signature against our order, then grant once."""
    permit = authorize(principal, "billing.buy")  # the order's user: checked with it
    settled = await billing.verify_checkout(
        permit, body.razorpay_order_id, body.razorpay_payment_id, body.razorpay_signature
    )
    if settled.outcome in ("rejected", "ignored"):
        # Returned, not raised: the alert and the payment's record must commit.
        error = Conflict(
            "The payment does not match its order; nothing was granted",
            code="payment_rejected",
            payment_id=body.razorpay_payment_id,
        )
        return JSONResponse(error.body(), status_code=error.status_code)
    if settled.outcome in ("pending", "not_captured"):
        response.status_code = 202
    return VerifyResult(
        outcome=settled.outcome,  # type: ignore[arg-type]
        payment=payment_out(settled.payment) if settled.payment else None,
    )


@router.post(
    "/subscriptions",
    summary="Start a subscription (at Razorpay)",
    status_code=201,
    response_model=Subscription,
    responses={
        **ERRORS,
        201: {
            "content": {
                "application/json": {
                    "example": {
                        "subscription_id": "kusub_798b761d26b74859a821decc2a809346",
                        "razorpay_subscription_id": "sub_YufQY2fEUtGKFv",
                        "user_id": "101902121794505144784",
                        "item": "pro_monthly",
                        "credits": 1500,
                        "amount": 5000,
                        "currency": "USD",
                        "period": "month",
                        "key_id": "rzp_test_10f228c57614",
                        "status": "created",
                        "created_at": "2026-11-26T10:45:13Z",
                    }
                }
            }
        },
    },
)
async def create_subscription(
    body: SubscriptionCreate, principal: CurrentPrincipal, billing: BillingDep
) -> Subscription:
    """Subscribe a user to a plan; each charged period grants its allowance."""
    await _may("billing.buy", principal, billing, body.user_id)
    sub = await billing.create_subscription(body.user_id, body.item)
    return Subscription(
        subscription_id=sub["id"],
        razorpay_subscription_id=sub["razorpay_subscription_id"],
        user_id=sub["user_id"],
        item=sub["item_id"],
        credits=sub["credits_milli"],
        amount=sub["amount_minor"],
        currency=sub["currency"],
        period=sub["period"],
        key_id=sub["key_id"],
        status=sub["status"],
        created_at=sub["created_at"],
    )


@router.post(
    "/webhooks/razorpay",
    summary="Razorpay's webhook",
    response_model=WebhookAck,
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "status": "processed",
                        "event": "payment.captured",
                        "outcome": "granted",
                    }
                }
            }
        },
        202: {"description": "A refund whose payment is not known yet: kept and retried"},
        **error_responses(
            {
                400: (
                    "Bad signature or not a Razorpay event",
                    [
                        BadRequest("Webhook signature does not match", code="invalid_signature"),
                        BadRequest("Webhook body is not a Razorpay event", code="malformed_event"),
                    ],
                ),
                422: (
                    "The kit's validation error; not expected here (the body is read raw)",
                    STANDARD[422],
                ),
                503: (
                    "Webhooks are not configured",
                    ServiceUnavailable(
                        "Webhooks are not configured (KU_RAZORPAY_WEBHOOK_SECRET)",
                        code="billing_not_configured",
                    ),
                ),
            }
        ),
    },
)
async def razorpay_webhook(
    request: Request,
    billing: BillingDep,
    response: Response,
    x_razorpay_signature: Annotated[str | None, Header()] = None,
    x_razorpay_event_id: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    """Razorpay's webhook (public: authenticated by its signature over the raw body)."""
    raw = await request.body()
    ack = await billing.handle_webhook(raw, x_razorpay_signature, x_razorpay_event_id)
    if ack["status"] == "pending":
        response.status_code = 202
    return ack


@router.get("/payments", summary="A user's payments", response_model=PaymentPage, responses=ERRORS)
async def list_payments(
    user_id: UserId,
    principal: CurrentPrincipal,
    billing: BillingDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> PaymentPage:
    """A user's payments, newest first, with status and the credits each granted."""
    await _may("billing.read", principal, billing, user_id)
    rows = await billing.repo.payments_of(user_id, limit=limit)
    return PaymentPage(items=[payment_out(r) for r in rows])


@router.get(
    "/revenue",
    summary="A month's revenue by currency",
    response_model=Revenue,
    responses={
        **ERRORS,
        200: {"content": {"application/json": {"example": {"month": "2026-11", "items": []}}}},
    },
)
async def get_revenue(
    principal: CurrentPrincipal,
    billing: BillingDep,
    month: Annotated[
        str | None,
        Query(pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])$", description="YYYY-MM; default this month"),
    ] = None,
) -> dict[str, Any]:
    """Money received in a calendar month (UTC) by currency, net of refunds (admin, and the
    enhancement service for its pool budget)."""
    authorize(principal, "billing.revenue")
    return await billing.revenue(month)


@router.get(
    "/alerts",
    summary="Payments that need a human (admin)",
    response_model=AlertPage,
    responses=ERRORS,
)
async def list_alerts(
    principal: CurrentPrincipal,
    billing: BillingDep,
    since: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> AlertPage:
    """Payments that need a human: amount mismatches, charges after cancellation (admin)."""
    authorize(principal, "billing.admin")
    rows = await billing.repo.alerts(since=since, limit=limit)
    return AlertPage(
        items=[
            Alert(
                id=r["id"],
                kind=r["kind"],
                payment_id=r["razorpay_payment_id"],
                order_id=r["order_id"],
                user_id=r["user_id"],
                detail=r["detail"],
                created_at=r["created_at"],
            )
            for r in rows
        ]
    )


ADMIN_ERRORS = error_responses(
    {
        401: "Missing or invalid credentials",
        403: ("Not an admin", Forbidden("Missing scope: admin", code="missing_scope")),
        422: "Invalid input",
    }
)


@router.get(
    "/admin/payments",
    response_model=PaymentPage,
    summary="Recent payments of every user (admin)",
    responses=ADMIN_ERRORS,
)
async def recent_payments(
    principal: CurrentPrincipal,
    billing: BillingDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> PaymentPage:
    """Every user's payments, newest first: status, the credits each granted, refunds,
    claw-backs and debt. The operators' view (the console's payments page)."""
    authorize(principal, "billing.admin")
    rows = await billing.repo.recent_payments(limit=limit)
    return PaymentPage(items=[payment_out(r) for r in rows])


@router.post(
    "/admin/reconcile",
    response_model=ReconcileResult,
    summary="Reconcile payments with Razorpay now (admin)",
    responses={
        **ADMIN_ERRORS,
        **error_responses(
            {503: ("Payments are not configured, or Razorpay cannot be reached", NOT_CONFIGURED)}
        ),
    },
)
async def reconcile_now(
    request: Request, principal: CurrentPrincipal, body: ReconcileIn | None = None
) -> ReconcileResult:
    """Run the reconcile job (`ku billing reconcile`) now: grant captured payments that
    neither checkout nor a webhook reported, apply refunds no webhook reported, retry
    parked refund events. Safe to run any time, twice or concurrently with the worker's
    cron: granted payments are never granted again."""
    authorize(principal, "billing.admin")
    # No request session here: the job opens a unit of work per payment, after each
    # Razorpay call, never holding a connection across one.
    counts = await reconcile(
        lookback_hours=body.hours if body else None,
        sessionmaker=request.app.state.sessionmaker,
        ledger=request.app.state.ledger,
        settings=get_settings(),
    )
    return ReconcileResult(counts=counts)
