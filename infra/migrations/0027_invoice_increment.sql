-- The billing increment an invoice's lines were rounded to: a month once drafted is shown and
-- reconciled at it, whatever increment `setPlan` sets later. NULL for invoices drafted before
-- it was recorded (they are shown at the workspace's current increment, as before).
-- The billing projector fills it from `Invoice.Drafted`.
ALTER TABLE rm_invoices ADD COLUMN billing_increment_micros bigint;
