-- Demo markets of the dev stack (scripts/dev, docker-compose.yml) and the tests, never of a
-- real deployment: deploy/sql holds the schema only, so a new production database serves no
-- made-up oracle prices. Applied after deploy/sql; existing rows are left as they are.
INSERT INTO oracle_prices (market, price, confidence, publish_time, source) VALUES
    ('BTC-USD', 64123.45, 12.5, now(), 'pyth'),
    ('ETH-USD', 3421.0712, 1.25, now(), 'pyth'),
    ('SOL-USD', 151.234, 0.08, now(), 'pyth'),
    ('DOGE-USD', 0.123456789, NULL, now(), 'chainlink')
ON CONFLICT (market) DO NOTHING;
