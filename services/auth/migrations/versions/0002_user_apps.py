"""user_apps (links between users and partner apps); refresh_tokens.app

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "user_apps",
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("app", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(["app"], ["auth.apps.name"], name=op.f("fk_user_apps_app_apps")),
        sa.ForeignKeyConstraint(
            ["user_id"], ["auth.users.id"], name=op.f("fk_user_apps_user_id_users")
        ),
        sa.PrimaryKeyConstraint("user_id", "app", name=op.f("pk_user_apps")),
        schema="auth",
    )
    op.add_column("refresh_tokens", sa.Column("app", sa.Text(), nullable=True), schema="auth")


def downgrade() -> None:
    op.drop_column("refresh_tokens", "app", schema="auth")
    op.drop_table("user_apps", schema="auth")
