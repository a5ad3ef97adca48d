//! The test harness itself: a test that fails before [`TestEnv::finish`] must not leave its vhost
//! and database on the machine's services (a run of the suite would otherwise pile them up).

use lapin::{Connection, ConnectionProperties};
use sqlx::Connection as _;
use sqlx::postgres::PgConnection;
use trio_tests::TestEnv;

/// An environment dropped without `finish` (as when its test panics) removes its vhost and its
/// database: afterwards neither accepts a connection.
#[tokio::test]
async fn an_environment_dropped_before_finish_removes_its_vhost_and_database() {
    // `start` returns once the gateway declared its topology, so the drop below cannot race
    // with a queue declaration (see `TestEnv::start_with`).
    let env = TestEnv::start().await;
    let database_url = env.config.database_url.expose().to_owned();
    // The harness's URLs take the user name as password, which is guest's.
    let amqp_url = env.amqp_url_as("guest");
    // Both are there while the environment lives.
    PgConnection::connect(&database_url)
        .await
        .expect("the test database exists")
        .close()
        .await
        .unwrap();
    Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .expect("the test vhost exists")
        .close(200, "bye")
        .await
        .unwrap();

    drop(env);

    let database = PgConnection::connect(&database_url).await;
    assert!(
        database.is_err(),
        "the database of a dropped environment is still there"
    );
    let vhost = Connection::connect(&amqp_url, ConnectionProperties::default()).await;
    assert!(
        vhost.is_err(),
        "the vhost of a dropped environment is still there"
    );
}
