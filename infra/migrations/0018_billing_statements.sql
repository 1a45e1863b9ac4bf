-- Billing beyond usage: workspace credits (negative statement lines) and issued invoices.
-- Both belong to the billing projector and are rebuilt with it.

CREATE TABLE rm_billing_credits (
    workspace_id uuid NOT NULL,
    credit_id uuid PRIMARY KEY,
    month text NOT NULL,
    amount_micros bigint NOT NULL,
    reason text NOT NULL,
    at timestamptz NOT NULL
);
CREATE INDEX rm_billing_credits_month_idx ON rm_billing_credits (workspace_id, month);

-- One row per workspace and month once invoicing drafted it: the lines it was drafted with
-- (never recomputed), and what Stripe made of it.
CREATE TABLE rm_invoices (
    workspace_id uuid NOT NULL,
    month text NOT NULL,
    invoice_id uuid NOT NULL UNIQUE,
    lines jsonb NOT NULL,
    total_micros bigint NOT NULL,
    stripe_invoice_id text,
    status text NOT NULL,
    PRIMARY KEY (workspace_id, month)
);

SELECT agentworks_secure_read_model(t::regclass) FROM unnest(ARRAY[
    'rm_billing_credits', 'rm_invoices'
]) AS t;
